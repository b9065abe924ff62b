import pytest


@pytest.fixture(scope="package")
def cluster():
    """A 2-CPU local Ray cluster for every engine test (no dashboard)."""
    ray = pytest.importorskip("ray", reason="the ray engine needs the ray extra (pip install 'vitcircuits[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
