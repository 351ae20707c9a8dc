"""The README's plugin example, kept true by running it (copied verbatim)."""
# conftest.py
import pytest
from pytest_enclave import ServiceConfig

HTTP = ["python3", "-m", "http.server", "-b", "{{ip}}", "8000"]


@pytest.fixture(scope="module")  # built once per module, restored before every test
def enclave_services():
    def run(enclave):
        for name in ("db_1", "db_2"):
            enclave.add_service(
                name, ServiceConfig(cmd=HTTP, ports={"http": 8000}, subnetwork="main")
            )
        enclave.add_service("app", ServiceConfig(cmd=["sleep", "infinity"], subnetwork="main"))

    return run
