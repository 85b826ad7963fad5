"""TLS material named by configs (a CA, a certificate, its key) and the ssl contexts made
from it: the API server's, and the clients' of etcd and of remote engines.

Invariants:
- a key file that its group or others may read is refused (`sigmad pki` writes 0600);
- a client context verifies the server against the CA and checks its name or address;
- files are checked when a config is loaded (readable, PEM that ssl accepts), so a bad path
  is a SpecError naming the field at start-up, not a failed connection later.
"""

from __future__ import annotations

import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sigmad.errors import SpecError
from sigmad.spec import Fields

MIN_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a CA bundle, a certificate and its key ("" = not given)."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def pem(self) -> tuple[bytes, bytes | None, bytes | None]:
        """The CA, key and certificate as bytes (what gRPC's credentials take)."""
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return Path(self.ca).read_bytes(), read(self.key), read(self.cert)


def endpoint_problem(endpoints: list[str], tls: TlsFiles | None) -> str:
    """Why etcd `endpoints` cannot be used with `tls` ("" if they can): `https://` needs
    the CA (never plain text), `http://` takes no TLS files, one cluster is not both."""
    schemes = {urlsplit(e).scheme for e in endpoints}
    if not schemes <= {"http", "https"}:
        return "must be URLs like https://10.0.0.1:2379 (or http:// without TLS)"
    if schemes == {"http", "https"}:
        return "mixes http:// and https://: use https:// for every member"
    if "https" in schemes and (tls is None or not tls.ca):
        return "https:// needs the CA: set ca (and cert, key) beside endpoints"
    if "http" in schemes and tls is not None:
        return "http:// is plain text: use https:// endpoints with the TLS files"
    return ""


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A client's context: trusts `files.ca` only; presents `files.cert` when given."""
    context = ssl.create_default_context(cafile=files.ca)
    context.minimum_version = MIN_VERSION
    if files.cert:
        context.load_cert_chain(files.cert, files.key)
    return context


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A server's context: presents `files.cert`; with `files.ca`, requires clients to
    present a certificate it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    context.load_cert_chain(files.cert, files.key)
    if files.ca:
        context.load_verify_locations(files.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def check_key(field: str, path: str) -> None:
    """SpecError unless `path` is a key file only its owner may read."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise SpecError(field, f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SpecError(field, f"{path} may be read by others (mode {stat.S_IMODE(mode):o}): "
                        f"chmod 600 {path}")


def take_tls(section: Fields) -> TlsFiles | None:
    """The `ca`, `cert` and `key` fields of `section` (None when none is there): cert and
    key go together; every file named must be usable."""
    found = {}
    for name in ("ca", "cert", "key"):
        value = section.take(name, "")
        if not isinstance(value, str):
            raise SpecError(section.at(name), "must be the path of a PEM file")
        found[name] = value
    files = TlsFiles(**found)
    if files == TlsFiles():
        return None
    if bool(files.cert) != bool(files.key):
        missing, given = ("key", "cert") if files.cert else ("cert", "key")
        raise SpecError(section.at(missing), f"is required with {given}")
    check_files(section, files)
    return files


def tls_section(fields: Fields, key: str, ca: bool, cert: bool) -> TlsFiles | None:
    """The mapping `key` of `fields` (ca, cert, key) as TlsFiles, None if absent; `ca`
    and/or `cert` (with its key) required as asked."""
    raw = fields.take(key)
    if raw is None:
        return None
    section = Fields(fields.at(key), raw, "")
    files = take_tls(section) or TlsFiles()
    section.done()
    for name, wanted in (("ca", ca), ("cert", cert), ("key", cert)):
        if wanted and not getattr(files, name):
            raise SpecError(section.at(name), "is required: the path of a PEM file "
                            "(made by 'sigmad pki')")
    return files


def check_files(section: Fields, files: TlsFiles) -> None:
    """SpecError naming the field whose file cannot be used."""
    if files.key:
        check_key(section.at("key"), files.key)
    for name in ("ca", "cert"):
        path = getattr(files, name)
        if path and not Path(path).is_file():
            raise SpecError(section.at(name), f"cannot read {path}: no such file")
    try:
        if files.ca:
            ssl.create_default_context(cafile=files.ca)
    except (ssl.SSLError, ValueError) as exc:
        raise SpecError(section.at("ca"), f"{files.ca} is not a PEM CA certificate: "
                        f"{exc}") from None
    try:
        if files.cert:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, ValueError) as exc:
        raise SpecError(section.at("cert"), f"{files.cert} and {files.key} are not a PEM "
                        f"certificate and its key: {exc}") from None
