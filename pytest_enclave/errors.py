"""Exceptions raised by pytest-enclave.

Every error is an :class:`EnclaveError`; foreign exceptions (``NetlinkError``, ``OSError``,
docker errors) are caught at the boundary and re-raised as one of these, ``from`` the original::

    EnclaveError
    ├── ConfigError             a value given by the caller is not allowed (ValueError too)
    │   └── UnknownNameError    a service or subnetwork that must exist does not (KeyError too)
    ├── PermissionDeniedError   not root / no CAP_NET_ADMIN and CAP_SYS_ADMIN
    ├── CapabilityError         this kernel or machine cannot honour what was asked
    ├── ServiceError            a service could not be started, did not get ready, or died
    │   └── ReadyTimeoutError   a ready condition did not hold within its timeout
    ├── BackendError            the backend (kernel, Docker engine) refused an operation
    └── EnclaveClosedError      the enclave was already closed
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CapabilityError",
    "ConfigError",
    "EnclaveClosedError",
    "EnclaveError",
    "PermissionDeniedError",
    "ReadyTimeoutError",
    "ServiceError",
    "UnknownNameError",
]


class EnclaveError(Exception):
    """Base of every error raised by pytest-enclave."""


class ConfigError(EnclaveError, ValueError):
    """A value given by the caller is not allowed; the message names it and what is allowed."""


class UnknownNameError(ConfigError, KeyError):
    """A service or subnetwork name that must exist does not."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PermissionDeniedError(EnclaveError):
    """The process lacks the privileges needed (root, or CAP_NET_ADMIN and CAP_SYS_ADMIN)."""


class CapabilityError(EnclaveError):
    """This kernel or machine cannot honour a requested feature (e.g. delay without netem)."""


class ServiceError(EnclaveError):
    """A service could not be started, did not become ready, or exited."""


class ReadyTimeoutError(ServiceError):
    """A ready condition did not hold within its timeout."""


class BackendError(EnclaveError):
    """The backend (kernel via netlink, nftables, the Docker engine) refused an operation."""


class EnclaveClosedError(EnclaveError):
    """The enclave was used after it was closed."""
