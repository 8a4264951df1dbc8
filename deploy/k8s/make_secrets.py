"""Make the key material the Kubernetes manifests (deploy/k8s/) mount, as one folder per Secret, offline.

    python deploy/k8s/make_secrets.py --namespace hivemesh --out ./hivemesh-secrets

then create each Secret from its folder (every file becomes one key), as the script prints:

    kubectl -n hivemesh create secret generic hivemesh-ca --from-file=./hivemesh-secrets/hivemesh-ca/

One mesh CA signs everything, as with `hivemesh up`: the workloads' certificates (the control plane issues them),
etcd's member certificate (its names cover every member's DNS name in the namespace, for clients and for peers)
and the bootstrap identity `root` the auth Job uses once. The CA folder (`ca/`) is also the operator's
`--certs-dir` (operator.pem/.key). Keys are written 0600; keep the folder out of version control.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from hivemesh.controlplane.ca import CaFiles, init_ca, load_ca
from hivemesh.controlplane.etcd_certs import ETCD_TTL_S
from hivemesh.mesh.etcd_roles import ROOT_USER
from hivemesh.mesh.pki import SCHEME
from hivemesh.mesh.settings import DEFAULT_TRUST_DOMAIN

ETCD_SERVICE: Final = "hivemesh-etcd"
ETCD_MEMBERS: Final = 3

SECRET_KEYS: Final[dict[str, tuple[str, ...]]] = {
    # The control plane: the CA it signs with, its own certificate (also its etcd identity, Common Name
    # `controlplane`), and the operator identity for `kubectl exec ... hivemesh <command>`.
    "hivemesh-ca": ("ca.pem", "ca.key", "controlplane.pem", "controlplane.key", "operator.pem", "operator.key"),
    # Every workload: the trust bundle only (their own keys come from joining).
    "hivemesh-ca-bundle": ("ca.pem",),
    # Each etcd member: its server and peer certificate, and the bundle whose client certificates it accepts.
    "hivemesh-etcd-tls": ("tls.crt", "tls.key", "ca.pem"),
    # The auth bootstrap Job: etcd's `root` user.
    "hivemesh-etcd-root": ("root.pem", "root.key", "ca.pem"),
}
"""Secret name -> the keys the manifests mount from it."""


def etcd_dns_names(namespace: str, members: int = ETCD_MEMBERS) -> list[str]:
    """Every name a client or a peer may check etcd's certificate against: each member's and the Service's, short
    and qualified (hivemesh-etcd-0.hivemesh-etcd, ....<ns>, ....<ns>.svc, ....<ns>.svc.cluster.local)."""
    hosts = [f"{ETCD_SERVICE}-{i}.{ETCD_SERVICE}" for i in range(members)] + [ETCD_SERVICE]
    suffixes = ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.cluster.local")
    return [h + s for h in hosts for s in suffixes] + ["localhost"]


def make_secrets(out: Path, namespace: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> dict[str, Path]:
    """Create a CA in out/ca and one folder per Secret in out/<secret>; returns secret name -> folder."""
    files = init_ca(out / "ca", trust_domain)  # refuses to overwrite an existing CA
    ca = load_ca(files.certs_dir)
    etcd_cert, etcd_key = ca.issue_with_new_key(
        f"{SCHEME}{trust_domain}/etcd", common_name="etcd", dns_names=etcd_dns_names(namespace),
        ips=["127.0.0.1"], ttl_s=ETCD_TTL_S,
    )
    root_cert, root_key = ca.issue_with_new_key(
        f"{SCHEME}{trust_domain}/etcd-root", common_name=ROOT_USER, dns_names=[], ttl_s=ETCD_TTL_S,
    )
    made = {"tls.crt": etcd_cert, "tls.key": etcd_key, "root.pem": root_cert, "root.key": root_key}
    folders: dict[str, Path] = {}
    for secret, keys in SECRET_KEYS.items():
        folder = out / secret
        folder.mkdir(mode=0o700, parents=True, exist_ok=False)
        for key in keys:
            target = folder / key
            if key in made:
                target.write_bytes(made[key])
            else:
                shutil.copyfile(_ca_file(files, key), target)
            target.chmod(0o600 if key.endswith(".key") else 0o644)
        folders[secret] = folder
    return folders


def _ca_file(files: CaFiles, key: str) -> Path:
    path = files.certs_dir / key
    if not path.is_file():
        raise FileNotFoundError(f"{path} was not made by init_ca")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_secrets.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", required=True, help="the namespace the overlay deploys to")
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the key material")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty: it may hold a CA already; choose a new folder")
    try:
        folders = make_secrets(args.out, args.namespace, args.trust_domain)
    except ValueError as exc:
        parser.error(str(exc))
    lines = [f"kubectl -n {args.namespace} create secret generic {s} --from-file={f}/" for s, f in folders.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stderr.write(f"# the operator's certificates: hivemesh --certs-dir {args.out / 'ca'} ...\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
