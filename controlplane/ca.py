"""The hivemesh certificate authority: a root that signs short-lived SPIFFE workload certificates.

`init_ca` writes a fresh root plus two identities the system needs before anything can join: the operator's
client certificate (for the CLI) and the control plane's server certificate, all of them or none, even when killed
(`CA_PENDING`). `load_ca` reads it back. The CA decides every identity itself: a CSR contributes only its public
key, never its requested names.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hivemesh.mesh.advertise import san_entries
from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError
from hivemesh.mesh.etcd_roles import CONTROLPLANE_USER, MAX_COMMON_NAME, etcd_user
from hivemesh.mesh.files import write_atomic, write_synced
from hivemesh.mesh.pki import (
    SCHEME,
    controlplane_dns_name,
    controlplane_id,
    parse_spiffe_id,
    spiffe_id_of,
    validate_trust_domain,
)

log = logging.getLogger(__name__)

CA_TTL_S: Final = 10 * 365 * 86400
OPERATOR_TTL_S: Final = 30 * 86400
CONTROLPLANE_TTL_S: Final = 90 * 86400
MAX_LEAF_TTL_S: Final = 30 * 86400
_SKEW = datetime.timedelta(seconds=30)
_MAX_CSR_BYTES = 16 * 1024
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


@dataclass(frozen=True)
class CaFiles:
    """Where `init_ca` put everything (private keys are 0600)."""

    certs_dir: Path
    ca_cert: Path
    ca_key: Path
    operator_cert: Path
    operator_key: Path
    controlplane_cert: Path
    controlplane_key: Path

    @classmethod
    def in_dir(cls, certs_dir: Path) -> CaFiles:
        d = Path(certs_dir)
        return cls(
            certs_dir=d,
            ca_cert=d / "ca.pem",
            ca_key=d / "ca.key",
            operator_cert=d / "operator.pem",
            operator_key=d / "operator.key",
            controlplane_cert=d / "controlplane.pem",
            controlplane_key=d / "controlplane.key",
        )

    def all(self) -> tuple[Path, ...]:
        return (
            self.ca_cert, self.ca_key, self.operator_cert, self.operator_key,
            self.controlplane_cert, self.controlplane_key,
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a synced temp file + rename, so a reader never sees half a key (`hivemesh.mesh.files`)."""
    write_atomic(path, data, mode)


class CertificateAuthority:
    """A loaded CA: its certificate, its key and the trust bundle it publishes."""

    def __init__(
        self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, bundle_pem: bytes | None = None
    ) -> None:
        uri = spiffe_id_of(cert)
        self.trust_domain = validate_trust_domain(uri[len(SCHEME):].rstrip("/"))
        pub = cert.public_key()
        if (
            not isinstance(pub, ec.EllipticCurvePublicKey)
            or pub.public_numbers() != key.public_key().public_numbers()
        ):
            raise ValueError("the CA key does not belong to the CA certificate")
        self.certificate = cert
        self._key = key
        self._bundle = bundle_pem or cert.public_bytes(serialization.Encoding.PEM)

    def bundle_pem(self) -> bytes:
        """The trust bundle (PEM) peers verify mesh certificates with."""
        return self._bundle

    @staticmethod
    def check_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
        """Parse a CSR and prove its signature (key possession); InvalidInputError when unusable."""
        if not isinstance(csr_pem, bytes | bytearray) or not csr_pem:
            raise InvalidInputError("a CSR (PEM) is required", field_violations={"csr_pem": "required"})
        if len(csr_pem) > _MAX_CSR_BYTES:
            raise InvalidInputError("the CSR is too large", field_violations={"csr_pem": "over 16 KiB"})
        try:
            csr = x509.load_pem_x509_csr(bytes(csr_pem))
        except ValueError as exc:
            raise InvalidInputError(
                f"the CSR is not a valid PEM PKCS#10 request: {exc}",
                field_violations={"csr_pem": "not a CSR"},
            ) from None
        try:
            valid = csr.is_signature_valid
        except (ValueError, InvalidSignature, TypeError):
            valid = False
        if not valid:
            raise InvalidInputError(
                "the CSR signature does not verify (it must be signed by the key it carries)",
                field_violations={"csr_pem": "bad signature"},
            )
        try:
            pub = csr.public_key()
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"the CSR public key is not usable: {exc}") from None
        ok = isinstance(pub, ed25519.Ed25519PublicKey) or (
            isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, _ACCEPTED_CURVES)
        )
        if not ok:
            raise InvalidInputError(
                "the CSR key must be EC P-256/P-384 or Ed25519", field_violations={"csr_pem": "key type"}
            )
        return csr

    def sign_csr(
        self,
        csr_pem: bytes,
        spiffe_id: str,
        *,
        ttl_s: int = 3600,
        dns_names: Sequence[str] | None = None,
        ips: Sequence[str] = (),
    ) -> bytes:
        """Issue a workload leaf for spiffe_id with the CSR's public key; return it as PEM.

        Whatever names the CSR asks for are ignored. The leaf carries exactly one URI SAN (spiffe_id), DNS
        SANs `<name>.<kind>.<td>` and `localhost` (or exactly dns_names when given), IP SANs ips (the address
        the control plane saw the request come from, so a client that checks the IP it dialled accepts a
        workload on another host), serverAuth+clientAuth, CA:FALSE, notBefore = now-30 s (clock skew),
        notAfter = now+ttl_s (never past the CA's own expiry).
        """
        try:
            sid = parse_spiffe_id(spiffe_id)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        if sid.trust_domain != self.trust_domain:
            raise InvalidInputError(f"{sid} is not in this CA's trust domain {self.trust_domain}")
        if not isinstance(ttl_s, int) or not 1 <= ttl_s <= MAX_LEAF_TTL_S:
            raise InvalidInputError(f"certificate ttl must be 1..{MAX_LEAF_TTL_S} s, got {ttl_s!r}")
        csr = self.check_csr(csr_pem)
        names = list(dns_names) if dns_names is not None else [sid.dns_name, "localhost"]
        cert = self._issue(
            csr.public_key(),  # type: ignore[arg-type]
            str(sid),
            common_name=etcd_user(sid.kind, sid.name),  # the etcd user of this workload (mesh/etcd_roles.py)
            dns_names=names,
            ttl_s=ttl_s,
            ips=ips,
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
        uri: str,
        *,
        common_name: str,
        dns_names: Sequence[str],
        ttl_s: int,
        ips: Sequence[str] = (),
    ) -> x509.Certificate:
        if not 0 < len(common_name) <= MAX_COMMON_NAME:
            # Never cut short: etcd takes the CN as the user, so a cut one could be another workload's.
            raise ValueError(f"a certificate's Common Name takes 1 to {MAX_COMMON_NAME} characters, not "
                             f"{len(common_name)}")
        now = _now()
        not_after = min(now + datetime.timedelta(seconds=ttl_s), self.certificate.not_valid_after_utc)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        seen: set[str] = set()
        for name in dns_names:
            if name not in seen:
                seen.add(name)
                sans.append(x509.DNSName(name))
        sans.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hivemesh"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        return builder.sign(self._key, hashes.SHA256())

    def issue_with_new_key(
        self,
        uri: str,
        *,
        common_name: str,
        dns_names: Sequence[str],
        ttl_s: int,
        ips: Sequence[str] = (),
    ) -> tuple[bytes, bytes]:
        """A fresh key and a leaf for a fixed identity (operator, control plane): (cert_pem, key_pem)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(
            key.public_key(), uri, common_name=common_name, dns_names=dns_names, ttl_s=ttl_s, ips=ips
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def issue_key_cert(
        self, public_key: ed25519.Ed25519PublicKey, uri: str, *, common_name: str, ttl_s: int = CONTROLPLANE_TTL_S
    ) -> bytes:
        """A certificate binding a signing key the control plane holds (the audit checkpoint key) to uri, so
        operators trust it through the bundle they already have: PEM."""
        cert = self._issue(public_key, uri, common_name=common_name, dns_names=[], ttl_s=ttl_s)
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue_controlplane_cert(
        self, ttl_s: int = CONTROLPLANE_TTL_S, *, hosts: Sequence[str] = ()
    ) -> tuple[bytes, bytes]:
        """The control plane's server certificate: URI SAN spiffe://<td>/controlplane, DNS
        controlplane.<td> and localhost, IP 127.0.0.1, plus the advertised hosts (names or IPs), so a client
        that checks the host it dialled (grpcurl, a load balancer's health check) accepts it too."""
        dns, ips = san_entries(hosts)
        return self.issue_with_new_key(
            controlplane_id(self.trust_domain),
            common_name=CONTROLPLANE_USER,  # an etcd user holding the root role
            dns_names=[controlplane_dns_name(self.trust_domain), "localhost", *dns],
            ips=["127.0.0.1", *(ip for ip in ips if ip != "127.0.0.1")],
            ttl_s=ttl_s,
        )

    def issue_operator_cert(self, name: str = "admin", ttl_s: int = OPERATOR_TTL_S) -> tuple[bytes, bytes]:
        """An operator (CLI) client identity spiffe://<td>/operator/<name>."""
        sid = parse_spiffe_id(f"{SCHEME}{self.trust_domain}/operator/{name}")
        return self.issue_with_new_key(
            str(sid), common_name=etcd_user("operator", name), dns_names=[sid.dns_name, "localhost"], ttl_s=ttl_s
        )


def _new_root(trust_domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hivemesh"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"hivemesh root CA ({trust_domain})"[:64]),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + datetime.timedelta(seconds=CA_TTL_S))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{SCHEME}{trust_domain}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


CA_PENDING: Final = ".ca-in-progress"
"""Created and flock-ed in the certificates folder by `init_ca` (for `hivemesh certs init` and `hivemesh up` alike)
before the first file of a new CA, removed after the last: found there and not locked, it marks what a maker killed
mid-way (SIGKILL: no cleanup ran) left. It holds its maker's pid and command, for the next one's messages."""

Maker = Literal["hivemesh certs init", "hivemesh up"]
"""Who makes a CA: written in CA_PENDING, so whoever finds the marker can say whose it is."""


class CaBusyError(RuntimeError):
    """Another live process holds the CA_PENDING marker: it is making a CA in that folder right now."""

    def __init__(self, certs_dir: Path, maker: Maker, pid: int | None) -> None:
        self.certs_dir, self.maker, self.pid = certs_dir, maker, pid
        who = f"`{maker}`" + (f" (pid {pid})" if pid else "")
        super().__init__(f"another {who} is making a CA in {certs_dir} right now: nothing there was changed; run "
                         "this again once that one has finished")


@dataclass(frozen=True)
class Unfinished:
    """What a maker killed while it made a CA left, as the next `init_ca` found it (and removed it)."""

    maker: Maker
    removed: tuple[str, ...]
    """The names of the files removed: CA files and their temp files (`write_atomic`'s `.<name>.tmp`)."""


def _marker_says(fd: int) -> tuple[Maker, int | None]:
    """The maker and pid a CA_PENDING marker names. One that names no maker is taken for an `up`'s: before makers
    wrote their names, only `up` made markers (empty ones)."""
    try:
        text = os.pread(fd, 128, 0).decode("ascii", "replace")
    except OSError:
        text = ""
    pid, _, rest = text.strip().partition(" ")
    maker: Maker = "hivemesh certs init" if rest == "hivemesh certs init" else "hivemesh up"
    return maker, int(pid) if pid.isdigit() else None


def _claim(marker: Path, maker: Maker) -> tuple[int, Maker | None]:
    """Create (or take over) marker, hold an exclusive flock on it and write our pid and maker in it: (its fd, the
    maker of a killed one found there, else None). The kernel drops the lock when its holder dies, however it dies,
    so a marker that can be locked is a dead maker's; one that cannot is a live one's: CaBusyError."""
    for _ in range(5):
        try:
            fd, found = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), False
        except FileExistsError:
            try:
                fd, found = os.open(marker, os.O_RDWR), True
            except FileNotFoundError:
                continue  # its maker finished between our two opens: look again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, pid = _marker_says(fd)
            os.close(fd)
            raise CaBusyError(marker.parent, holder, pid) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(marker))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)  # its maker finished and removed it between our open and our lock: look again
            continue
        killed = _marker_says(fd)[0] if found else None
        with contextlib.suppress(OSError):  # only for messages: a full disk fails the CA's own writes, cleanly
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {maker}\n".encode(), 0)
        return fd, killed
    raise RuntimeError(f"could not claim {marker}: other processes keep creating and removing it")


def _remove_ca_files(files: CaFiles) -> tuple[str, ...]:
    """Remove each CA file and its temp file (`write_atomic`'s `.<name>.tmp`); the names of those removed."""
    removed = []
    for path in files.all():
        for each in (path, path.with_name(f".{path.name}.tmp")):
            with contextlib.suppress(FileNotFoundError):
                each.unlink()
                removed.append(each.name)
    return tuple(removed)


def _write_ca(files: CaFiles, trust_domain: str, replaced: list[Path]) -> None:
    """Make a CA and write it into files: every file written and synced beside its place first (`.<name>.tmp`),
    then each renamed into place, appended to replaced once it is. A failure before the renames (a key that cannot
    be made, a full disk, Ctrl-C) removes the temp files and leaves the folder as it was, an old CA whole; only a
    failure among the renames leaves old and new files mixed."""
    cert, key = _new_root(trust_domain)
    ca = CertificateAuthority(cert, key)
    op_cert, op_key = ca.issue_operator_cert()
    cp_cert, cp_key = ca.issue_controlplane_cert()
    # Keys first, certificates last: renamed in this order, a crash between leaves no certificate without its key.
    material = ((files.ca_key, _key_pem(key), 0o600), (files.operator_key, op_key, 0o600),
                (files.controlplane_key, cp_key, 0o600),
                (files.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644),
                (files.operator_cert, op_cert, 0o644), (files.controlplane_cert, cp_cert, 0o644))
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in material:
            tmp = path.with_name(f".{path.name}.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # left by a crash mid-write
            staged.append((tmp, path))
            write_synced(tmp, data, mode)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
        replaced.append(path)


def init_ca(
    certs_dir: Path,
    trust_domain: str,
    *,
    force: bool = False,
    maker: Maker = "hivemesh certs init",
    on_unfinished: Callable[[Unfinished], None] | None = None,
) -> CaFiles:
    """Create a root CA, an operator identity and the control plane's server certificate in certs_dir: all of
    them, or (killed or failing part-way) nothing a later call takes for a CA.

    Refuses (FailedPreconditionError) when any of the files exists, unless force=True: overwriting a CA
    silently would orphan every certificate it signed. Works under certs_dir's CA_PENDING marker, so that:
    - what a killed maker (this, for `certs init` or `up`) left is removed and made anew, force or not, after
      telling on_unfinished: those files are no CA, and refusing over them left no way on but by hand;
    - a marker a live maker holds is CaBusyError, with nothing touched (its files would be removed under it);
    - a failure while writing (a full disk) leaves the folder as it was, with force the old CA whole (every file
      is written beside its place before any is renamed); one among the renames removes every CA file (half of
      each is no CA); then it raises as it was. A file that cannot be removed keeps the marker, for the next call.
    """
    validate_trust_domain(trust_domain)
    files = CaFiles.in_dir(Path(certs_dir))
    marker = files.certs_dir / CA_PENDING

    def refuse_over_a_ca() -> None:
        existing = [p.name for p in files.all() if p.exists()]
        if existing and not force:
            raise FailedPreconditionError(
                f"{files.certs_dir} already holds CA material ({', '.join(existing)}); refusing to overwrite it "
                "(use force / --force to replace the CA and invalidate every certificate it signed)"
            )

    if not marker.exists():
        refuse_over_a_ca()  # before any write: a folder we may not write in still gets this answer
    existed = files.certs_dir.is_dir()
    files.certs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, killed = -1, None
    clean = True  # no file this call may have left half-done is on disk: the marker may go
    try:
        fd, killed = _claim(marker, maker)
        if killed is not None:
            clean = False
            left = Unfinished(killed, _remove_ca_files(files))
            clean = True
            if on_unfinished is not None:
                on_unfinished(left)
        else:
            refuse_over_a_ca()  # again, under the marker: another maker may have finished since
        clean = False
        replaced: list[Path] = []
        try:
            _write_ca(files, trust_domain, replaced)
        except BaseException:
            with contextlib.suppress(OSError):
                if replaced:  # old files and new ones mixed: no CA, the old one's files go too
                    _remove_ca_files(files)
                clean = True  # else the folder is as it was: an old CA whole, or none
            raise
        marker.unlink()  # the CA is whole: from here on, a kill leaves it as it is
    except BaseException:
        if fd >= 0 and clean:
            with contextlib.suppress(OSError):
                marker.unlink()
        if not existed:
            with contextlib.suppress(OSError):
                files.certs_dir.rmdir()  # only when empty
        raise
    finally:
        if fd >= 0:
            os.close(fd)  # after the unlink: a maker waiting on the lock then finds no marker
    log.info("initialised CA for %s in %s", trust_domain, files.certs_dir)
    return files


def load_ca(certs_dir: Path) -> CertificateAuthority:
    """Load the CA from certs_dir (ca.pem: the signing certificate first, then any other trusted roots)."""
    files = CaFiles.in_dir(Path(certs_dir))
    for p in (files.ca_cert, files.ca_key):
        if not p.is_file():
            raise FailedPreconditionError(
                f"no CA at {files.certs_dir}: {p.name} is missing (run `hivemesh certs init`)"
            )
    mode = files.ca_key.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("CA key %s is readable by others (mode %o); it should be 0600", files.ca_key, mode)
    bundle = files.ca_cert.read_bytes()
    try:
        certs = x509.load_pem_x509_certificates(bundle)
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    except ValueError as exc:
        raise FailedPreconditionError(f"unreadable CA material in {files.certs_dir}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FailedPreconditionError("the CA key must be an EC private key")
    try:
        return CertificateAuthority(certs[0], key, bundle)
    except ValueError as exc:
        raise FailedPreconditionError(f"bad CA in {files.certs_dir}: {exc}") from None


def _names_all(cert: x509.Certificate, hosts: Sequence[str]) -> bool:
    """True when cert carries a DNS or IP SAN for every one of hosts (wildcards ignored)."""
    dns, ips = san_entries(hosts)
    if not dns and not ips:
        return True
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_dns = set(sans.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return set(dns) <= have_dns and set(ips) <= have_ips


def ensure_controlplane_cert(
    ca: CertificateAuthority, certs_dir: Path, *, min_remaining_s: int = 86400, hosts: Sequence[str] = ()
) -> None:
    """Re-issue controlplane.pem/.key when missing, expiring within min_remaining_s, from another CA, or
    lacking a SAN for one of the advertised hosts, so a long-lived control plane never serves an expired
    certificate after a restart, nor one a remote caller's host-name check refuses."""
    files = CaFiles.in_dir(Path(certs_dir))
    fresh = False
    if files.controlplane_cert.is_file() and files.controlplane_key.is_file():
        try:
            cert = x509.load_pem_x509_certificate(files.controlplane_cert.read_bytes())
            remaining = cert.not_valid_after_utc - _now()
            fresh = (
                cert.issuer == ca.certificate.subject
                and remaining.total_seconds() > min_remaining_s
                and spiffe_id_of(cert) == controlplane_id(ca.trust_domain)
                and _names_all(cert, hosts)
            )
            if fresh:
                pub = ca.certificate.public_key()
                assert isinstance(pub, ec.EllipticCurvePublicKey)
                pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        except (ValueError, InvalidSignature):
            fresh = False
    if fresh:
        return
    cp_cert, cp_key = ca.issue_controlplane_cert(hosts=hosts)
    _write_atomic(files.controlplane_key, cp_key, 0o600)
    _write_atomic(files.controlplane_cert, cp_cert, 0o644)
    log.info("issued a fresh control-plane certificate in %s", files.certs_dir)
