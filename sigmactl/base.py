"""What every sigmactl command shares: the settings object, common options and emitters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from sigmactl import output
from sigmactl.client import Client, CtlError, ca_path, resolve

namespace_option = click.option(
    "-n", "--namespace", default="default", show_default=True, help="Namespace of the object."
)


def output_option(*formats: str, default: str | None = None) -> Any:
    """`-o/--output` with the given formats."""
    return click.option("-o", "--output", "fmt", default=default, show_default=bool(default),
                        type=click.Choice(list(formats)), help="Output format.")


@dataclass
class Settings:
    """The global options; the client is made only when a command needs it."""

    server: str | None
    token: str | None
    context: str | None = None

    def client(self) -> Client:
        """A client for the resolved servers and token."""
        return Client(*resolve(self.server, self.token, self.context),
                      ca=ca_path(self.context))


def items(answer: Any) -> list[dict[str, Any]]:
    """The `items` list of a list answer; CtlError if there is none."""
    found = answer.get("items") if isinstance(answer, dict) else None
    if not isinstance(found, list):
        raise CtlError("server answered without an item list: is --server a Sigma master?")
    return found


def obj(answer: Any, what: str) -> dict[str, Any]:
    """An answer that must be a JSON object; CtlError naming `what` otherwise."""
    if not isinstance(answer, dict):
        raise CtlError(f"server answered without {what}: is --server a Sigma master "
                       "of this version?")
    return answer


def emit(data: Any, fmt: str) -> None:
    """Print `data` as indented JSON or YAML."""
    click.echo(output.dump(data, fmt))
