"""`sigmad pki`: a cluster's certificate authority and the certificates of its parts.

A pki directory (default /etc/sigma/pki) holds, as PEM:

    ca.crt ca.key                      the cluster's CA (`init`)
    etcd-NAME-server.crt/.key          etcd member NAME, to its clients (SANs: its addresses)
    etcd-NAME-peer.crt/.key            etcd member NAME, to the other members
    master-NAME-api.crt/.key           master NAME's HTTPS API (SANs: its addresses)
    master-NAME-etcd.crt/.key          master NAME to etcd: etcd user `sigma-master`
    master-NAME-engine.crt/.key        master NAME to the nodes' engines (client)
    node-NAME.crt/.key                 agent NAME to etcd (etcd user `sigma-node-NAME`) and
                                       to its own engine (client)
    engine-NAME.crt/.key               node NAME's dockerd (--tlsverify; SANs: its addresses)
    root.crt/.key                      etcd user `root`: for `sigmad pki etcd-auth` only

Invariants:
- every file is written with mode 0600, whole or not at all (a temporary file renamed);
- the CA is never replaced unless asked (`force`): every certificate it signed would stop
  being trusted;
- the etcd user of a certificate is its common name (etcd's --client-cert-auth), so the
  names here and the roles of sigmad.etcd_access agree by construction.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DIR = Path("/etc/sigma/pki")
CA_DAYS = 3650
LEAF_DAYS = 825
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ROOT_USER = "root"
MASTER_USER = "sigma-master"
KINDS = ("etcd", "master", "node", "root")
SERVER = [ExtendedKeyUsageOID.SERVER_AUTH]
CLIENT = [ExtendedKeyUsageOID.CLIENT_AUTH]


def node_user(name: str) -> str:
    """The etcd user (and certificate common name) of node `name`'s agent."""
    return f"sigma-node-{name}"


class PkiError(Exception):
    """What went wrong, in words for the operator."""


@dataclass(frozen=True)
class Written:
    """A file written, and what it is for."""

    path: Path
    purpose: str


@dataclass(frozen=True)
class _Leaf:
    stem: str  # file name without .crt/.key
    common_name: str
    usages: list[x509.ObjectIdentifier]
    sans: bool  # whether the hosts go in (server certificates)
    purpose: str


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an old temporary file keeps its mode otherwise
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sigma"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _prepare(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)


def init_ca(directory: Path, force: bool = False, days: int = CA_DAYS,
            name: str = "sigma") -> list[Written]:
    """Make the CA (ca.crt, ca.key) in `directory`; PkiError if one is there and not
    `force`."""
    crt, key_path = directory / "ca.crt", directory / "ca.key"
    if (crt.exists() or key_path.exists()) and not force:
        raise PkiError(f"a CA is already in {directory}: replacing it would make every "
                       "certificate it signed untrusted. Use --force to replace it anyway")
    _prepare(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = _name(f"{name} CA")
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    write_private(crt, _cert_pem(cert))
    return [Written(crt, "the CA certificate: every part trusts it (ca: in configs)"),
            Written(key_path, "the CA key: keep it offline; it signs every certificate")]


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except FileNotFoundError:
        raise PkiError(f"no CA in {directory}: run 'sigmad pki init --dir {directory}' "
                       "first") from None
    except ValueError as exc:
        raise PkiError(f"the CA in {directory} cannot be read: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / 'ca.key'} is not a key made by 'sigmad pki init'")
    return cert, key


def _leaves(kind: str, name: str) -> list[_Leaf]:
    if kind == "etcd":
        return [
            # etcd's own gateway connects to it with the server certificate: client too.
            _Leaf(f"etcd-{name}-server", f"etcd-{name}", SERVER + CLIENT, True,
                  f"etcd member {name} to its clients (--cert-file, --key-file)"),
            _Leaf(f"etcd-{name}-peer", f"etcd-{name}", SERVER + CLIENT, True,
                  f"etcd member {name} to its peers (--peer-cert-file, --peer-key-file)"),
        ]
    if kind == "master":
        return [
            _Leaf(f"master-{name}-api", f"master-{name}", SERVER, True,
                  f"master {name}'s HTTPS API (tls: cert, key)"),
            _Leaf(f"master-{name}-etcd", MASTER_USER, CLIENT, False,
                  f"master {name} to etcd as user {MASTER_USER} (etcd: cert, key)"),
            _Leaf(f"master-{name}-engine", f"master-{name}", CLIENT, False,
                  f"master {name} to the nodes' engines (engine_tls: cert, key)"),
        ]
    if kind == "node":
        return [
            _Leaf(f"node-{name}", node_user(name), CLIENT, False,
                  f"agent {name} to etcd as user {node_user(name)} and to its engine "
                  "(etcd: and engine_tls: cert, key)"),
            _Leaf(f"engine-{name}", f"engine-{name}", SERVER, True,
                  f"node {name}'s dockerd (--tlsverify --tlscert --tlskey)"),
        ]
    if kind == "root":
        return [_Leaf("root", ROOT_USER, CLIENT, False,
                      "etcd user root: for 'sigmad pki etcd-auth' only; keep it offline")]
    raise PkiError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")


def issue(directory: Path, kind: str, name: str = "", hosts: tuple[str, ...] = (),
          days: int = LEAF_DAYS) -> list[Written]:
    """Sign the certificates of one part (`kind`: etcd, master, node or root) with the CA
    in `directory`; server certificates name `hosts` (addresses or DNS names)."""
    if kind != "root" and not NAME_RE.match(name):
        raise PkiError(f"name {name!r}: use 1 to 63 letters, digits, '.', '_' or '-' "
                       "(the node's name for a node)")
    leaves = _leaves(kind, name)
    if any(leaf.sans for leaf in leaves) and not hosts:
        raise PkiError(f"a {kind} certificate must name the addresses it is reached at: "
                       "--host ADDRESS (repeat it for each)")
    for host in hosts:
        if not host or any(c.isspace() for c in host):
            raise PkiError(f"--host {host!r}: an IP address or a DNS name")
    ca_cert, ca_key = _load_ca(directory)
    now = datetime.datetime.now(datetime.UTC)
    written = []
    for leaf in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(_name(leaf.common_name))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=days),
                                 ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_encipherment=False, key_cert_sign=False,
                crl_sign=False, content_commitment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(leaf.usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
        )
        if leaf.sans:
            builder = builder.add_extension(_san(list(hosts)), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        crt, key_path = directory / f"{leaf.stem}.crt", directory / f"{leaf.stem}.key"
        write_private(key_path, _key_pem(key))
        write_private(crt, _cert_pem(cert))
        written += [Written(crt, leaf.purpose), Written(key_path, f"its key ({leaf.stem})")]
    return written


def common_name(path: Path) -> str:
    """The common name of the certificate at `path` (its etcd user)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
