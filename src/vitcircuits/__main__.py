from vitcircuits.cli import app

app(prog_name="vitcircuits")
