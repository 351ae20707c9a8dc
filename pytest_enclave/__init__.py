"""pytest-enclave: isolated networks of real services, with partitions and lossy links.

Usable without pytest::

    from pytest_enclave import Enclave, ServiceConfig, ConnectionConfig

    with Enclave() as enclave:
        enclave.add_service("db", ServiceConfig(cmd=["my-db"], subnetwork="main"))
        enclave.set_connection(("main", "secondary"), ConnectionConfig(packet_loss_percentage=90))
"""

from __future__ import annotations

from .backends import ExecResult
from .config import (
    ALLOWED,
    BLOCKED,
    ConnectionConfig,
    NormalPacketDelayDistribution,
    PacketDelayDistribution,
    PortSpec,
    ServiceConfig,
    UniformPacketDelayDistribution,
    UpdateServiceConfig,
)
from .enclave import Checkpoint, Enclave, Service
from .errors import (
    BackendError,
    CapabilityError,
    ConfigError,
    EnclaveClosedError,
    EnclaveError,
    PermissionDeniedError,
    ReadyTimeoutError,
    ServiceError,
    UnknownNameError,
)
from .faults import Event, Fault, Timeline
from .ready import Exec, HttpGet, LogLine, TcpPort

__version__ = "0.1.0"

__all__ = [
    "ALLOWED",
    "BLOCKED",
    "BackendError",
    "CapabilityError",
    "Checkpoint",
    "ConfigError",
    "ConnectionConfig",
    "Enclave",
    "EnclaveClosedError",
    "EnclaveError",
    "Event",
    "Exec",
    "ExecResult",
    "Fault",
    "HttpGet",
    "LogLine",
    "NormalPacketDelayDistribution",
    "PacketDelayDistribution",
    "PermissionDeniedError",
    "PortSpec",
    "ReadyTimeoutError",
    "Service",
    "ServiceConfig",
    "ServiceError",
    "TcpPort",
    "Timeline",
    "UniformPacketDelayDistribution",
    "UnknownNameError",
    "UpdateServiceConfig",
    "__version__",
]
