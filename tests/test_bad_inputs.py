"""Every command against a table of bad inputs: one line naming the file or option, no traceback,
a non-zero exit (issue: data integrity and hostile inputs)."""
import os
import pickle

import numpy as np
import pytest
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.testing.checkpoints import noise_image_folder, tiny_vit_folder


class Payload:
    """Unpickling this would create a file: a weights-only load must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good, truncated, garbage = (tiny_vit_folder(root / name, depth=2) for name in ("good", "truncated", "garbage"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    malicious = root / "evil.pth"
    malicious.write_bytes(pickle.dumps({"weight": Payload(root / "pwned")}))
    images = noise_image_folder(root / "images", 6)
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    damaged = root / "damaged_run"
    (damaged / "composition").mkdir(parents=True)
    (damaged / "heads").mkdir()
    (damaged / "manifest.json").write_text('{"command": "sae-train", "config": {"model": ')
    (damaged / "circuits.json").write_text("[1, 2")
    (damaged / "composition" / "circuits.json").write_text('{"circuits": [1, 2')
    (damaged / "heads" / "atlas.json").write_text("NaN garbage")
    (damaged / "truth.json").write_text('{"source": 1}')
    return {"root": root, "good": good, "truncated": truncated, "garbage": garbage, "malicious": malicious, "images": images,
            "a_file": a_file, "damaged": damaged}


def _common(inputs, model=None, out=None):
    return ["--model", str(model or inputs["good"]), "--images", str(inputs["images"]), "--device", "cpu",
            "--out", str(out or inputs["root"] / "out" / str(np.random.default_rng().integers(1 << 30)))]


CASES = {
    "info: truncated safetensors": lambda i: ["info", str(i["truncated"])],
    "info: random bytes as safetensors": lambda i: ["info", str(i["garbage"])],
    "info: malicious pickle": lambda i: ["info", str(i["malicious"]), "--arch", "vit_tiny_patch16_224"],
    "info: unknown dtype": lambda i: ["info", str(i["good"]), "--dtype", "float8"],
    "info: unknown device": lambda i: ["info", str(i["good"]), "--device", "tpu:9"],
    "heads: truncated safetensors": lambda i: ["heads", *_common(i, model=i["truncated"])],
    "heads: --out under a file": lambda i: ["heads", *_common(i, out=i["a_file"] / "run")],
    "heads: --out is a file": lambda i: ["heads", *_common(i, out=i["a_file"])],
    "heads: missing images": lambda i: ["heads", "--model", str(i["good"]), "--images", str(i["root"] / "nowhere"), "--device", "cpu",
                                        "--out", str(i["root"] / "o1")],
    "cache: unknown hook": lambda i: ["cache", *_common(i), "--hooks", "blocks.9.hook_nothing"],
    "cache: malicious pickle": lambda i: ["cache", *_common(i, model=i["malicious"]), "--arch", "vit_tiny_patch16_224", "--hooks",
                                          "blocks.0.hook_resid_post"],
    "compose: damaged atlas": lambda i: ["compose", *_common(i), "--heads-from", str(i["damaged"])],
    "compose: unknown ablation": lambda i: ["compose", *_common(i), "--ablation", "sideways"],
    "hunt: garbage safetensors": lambda i: ["hunt", *_common(i, model=i["garbage"])],
    "hunt: damaged truth": lambda i: ["hunt", *_common(i), "--truth", str(i["damaged"] / "truth.json")],
    "hunt: --out under a file": lambda i: ["hunt", *_common(i, out=i["a_file"] / "run")],
    "necessity: damaged circuits": lambda i: ["necessity", *_common(i), "--circuits", str(i["damaged"])],
    "necessity: bad --heads": lambda i: ["necessity", *_common(i), "--heads", "one.two"],
    "sae train: damaged circuits": lambda i: ["sae", "train", *_common(i), "--circuits", str(i["damaged"])],
    "sae analyze: damaged manifest": lambda i: ["sae", "analyze", str(i["damaged"])],
    "sae analyze: not a run": lambda i: ["sae", "analyze", str(i["images"])],
    "demo: unknown organism": lambda i: ["demo", "--organism", "unicorn", "--out", str(i["root"] / "demo")],
    "serve: missing run folder": lambda i: ["serve", str(i["root"] / "nowhere"), "--no-browser", "--port", "0"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_a_non_zero_exit(inputs, case):
    result = CliRunner().invoke(app, CASES[case](inputs))
    lines = [line for line in result.output.splitlines() if line.strip() and "━" not in line and not line.startswith("stage ")]
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not (inputs["root"] / "pwned").exists(), "the pickle payload ran"


def test_debug_shows_the_traceback(inputs):
    result = CliRunner().invoke(app, ["--debug", "info", str(inputs["truncated"])])
    assert result.exit_code != 0 and not isinstance(result.exception, SystemExit)


def test_an_hf_source_offline_fails_before_any_hub_request(inputs, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(app, ["heads", "--model", str(inputs["good"]), "--images", "hf:cifar10", "--device", "cpu",
                                      "--out", str(inputs["root"] / "hf")])
    assert result.exit_code == 2 and "hub is not reachable" in result.output and "Traceback" not in result.output
