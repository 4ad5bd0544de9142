"""Command-line helpers shared by the stages."""

import argparse
import pathlib

from protos.security import TlsFiles, read_token_file


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when there is one worth showing (not None, not an on/off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or isinstance(action, (argparse._StoreTrueAction,
                                                                  argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def add_security_flags(parser, serves_grpc: bool, peer: str | None) -> None:
    """The security flags, the same on every stage: its TLS identity and its peers' CA; on a gRPC server its
    plaintext health port, reflection and token; on a client of `peer` (the next stage's short name, vision or
    llm, as in its flags) the server name and the token it sends."""
    roles = ([("its server certificate", "clients must present a certificate it signed (mutual TLS)")]
             if serves_grpc else [])
    if peer is not None:
        roles.append((f"the client certificate it presents to {peer}_svc",
                      f"{peer}_svc's certificate is verified with it (else with the system's roots)"))
    parser.add_argument("--tls-cert", type=pathlib.Path, metavar="FILE", default=None,
                        help=f"this stage's certificate chain (PEM): {', and '.join(r[0] for r in roles)}. Needs "
                             "--tls-key; without these flags the stage speaks plaintext gRPC")
    parser.add_argument("--tls-key", type=pathlib.Path, metavar="FILE", default=None,
                        help="the private key of --tls-cert (PEM)")
    parser.add_argument("--tls-ca", type=pathlib.Path, metavar="FILE", default=None,
                        help=f"the CA that signs this stage's peers (PEM): {'; '.join(r[1] for r in roles)}" +
                             (". The server re-reads its certificate, key and CA for new connections when their "
                              "files change" if serves_grpc else ""))
    if serves_grpc:
        parser.add_argument("--health-port", type=int, metavar="PORT", default=None,
                            help="also serve grpc.health.v1 alone, in plaintext, on this port: for probes that "
                                 "cannot speak TLS (Kubernetes gRPC probes)")
        parser.add_argument("--no-reflection", dest="reflection", action="store_false",
                            help="do not serve gRPC server reflection (which lists the stage's services)")
        parser.add_argument("--auth-token-file", type=pathlib.Path, metavar="FILE", default=None,
                            help="require 'authorization: Bearer TOKEN' metadata on every call (UNAUTHENTICATED "
                                 "otherwise; health checks exempt), TOKEN read from this file at start")
    if peer is not None:
        parser.add_argument("--tls-server-name", metavar="NAME", default=None,
                            help=f"the name {peer}_svc's server certificate must carry, in place of the host of "
                                 f"the --{peer} targets (for IP addresses, or a certificate made for another name)")
        parser.add_argument(f"--{peer}-auth-token-file", dest="peer_auth_token_file", type=pathlib.Path,
                            metavar="FILE", default=None,
                            help=f"send 'authorization: Bearer TOKEN' on every call to {peer}_svc, TOKEN read from "
                                 "this file at start (the file that stage's --auth-token-file names)")


def pop_security_args(args: argparse.Namespace, peer: str | None) -> dict:
    """Takes the flags of `add_security_flags` out of `args` as config fields: `tls` (TlsFiles), the tokens read
    from their files (`auth_token`, `<peer>_auth_token`), and the others under their own names. Raises
    ValueError, naming the flag, for a file that cannot be read."""
    fields = {"tls": TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)}
    for name in ("tls_cert", "tls_key", "tls_ca"):
        delattr(args, name)
    if hasattr(args, "auth_token_file"):
        path = args.auth_token_file
        fields["auth_token"] = read_token_file(path, "--auth-token-file") if path is not None else None
        fields["health_port"], fields["reflection"] = args.health_port, args.reflection
        for name in ("auth_token_file", "health_port", "reflection"):
            delattr(args, name)
    if peer is not None:
        path = args.peer_auth_token_file
        fields[f"{peer}_auth_token"] = read_token_file(path, f"--{peer}-auth-token-file") if path else None
        fields["tls_server_name"] = args.tls_server_name
        for name in ("peer_auth_token_file", "tls_server_name"):
            delattr(args, name)
    return fields
