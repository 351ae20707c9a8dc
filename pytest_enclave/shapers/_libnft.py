"""libnftables, in-process through ctypes (no ``nft`` subprocess in the hot path)."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from typing import Any

from ..errors import BackendError, CapabilityError

_lib: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise CapabilityError(
                "libnftables is not installed: `apt-get install libnftables1` (Debian/Ubuntu) "
                "or your distribution's nftables library package"
            ) from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        _lib = lib
    return _lib


class Nft:
    """One libnftables context. Use it from the thread (namespace) that created it."""

    NFT_CTX_OUTPUT_JSON = 1 << 4

    def __init__(self) -> None:
        self._lib = _load()
        self._ctx = self._lib.nft_ctx_new(0)
        self._lib.nft_ctx_buffer_output(self._ctx)
        self._lib.nft_ctx_buffer_error(self._ctx)

    def run(self, commands: str) -> str:
        """Run nft commands (one transaction); return the output, raise BackendError on error."""
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            first = commands if len(commands) < 2000 else commands[:2000] + " ..."
            raise BackendError(f"nftables refused the change: {err.strip()}\n--- input:\n{first}")
        return out

    def accepts(self, commands: str) -> bool:
        """Whether the kernel would take ``commands`` (checked, never committed)."""
        self._lib.nft_ctx_set_dry_run(self._ctx, True)
        try:
            self.run(commands)
            return True
        except BackendError:
            return False
        finally:
            self._lib.nft_ctx_set_dry_run(self._ctx, False)

    def run_json(self, commands: str) -> Any:
        self._lib.nft_ctx_output_set_flags(self._ctx, self.NFT_CTX_OUTPUT_JSON)
        try:
            return json.loads(self.run(commands) or "{}")
        finally:
            self._lib.nft_ctx_output_set_flags(self._ctx, 0)

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None
