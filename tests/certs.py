"""Certificates made at test time: one CA that signs every stage, a certificate per stage (named
`<stage>.internvl.test`, no IP address, so that clients must be told the name), and a rogue CA that signs a
certificate looking just like a stage's."""

import pathlib

import trustme

from protos.security import TlsFiles

STAGES = ("vision", "llm", "gateway")


def server_name(stage: str) -> str:
    return f"{stage}.internvl.test"


class TestPki:
    """Writes every file under `directory`: ca.crt, rogue-ca.crt, and <name>.crt / <name>.key per certificate."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self.ca, self.rogue_ca = trustme.CA(), trustme.CA()
        self.ca_path = directory / "ca.crt"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.rogue_ca.cert_pem.write_to_path(str(directory / "rogue-ca.crt"))
        self.stages = {stage: self.issue(stage, server_name(stage)) for stage in STAGES}
        # A rogue certificate carries a stage's name and presents the real CA, but the rogue CA signed it.
        self.rogue = self.issue("rogue", server_name("llm"), ca=self.rogue_ca)

    def issue(self, name: str, *hostnames: str, ca: trustme.CA | None = None) -> TlsFiles:
        """(Re)writes <name>.crt and <name>.key with a certificate for `hostnames`, signed by `ca` (default: the CA)."""
        leaf = (ca or self.ca).issue_cert(*hostnames)
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        leaf.private_key_pem.write_to_path(str(key))
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        return TlsFiles(cert, key, self.ca_path)

    def flags(self, stage: str) -> list[str]:
        files = self.stages[stage]
        return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]
