"""What `sigmad lab` prints for people: the status table and the summary after `up`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sigmad.lab.state import lab_context

if TYPE_CHECKING:
    from sigmad.lab.core import Lab


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def status_table(status: dict[str, Any]) -> str:
    rows = [("HOST", "ADDRESS", "NETNS", "ENGINE", "AGENT", "STATE")]
    rows += [(h["name"], h["address"], h["netns"], _yes(h["engine"]), _yes(h["agent"]),
              h["state"]) for h in status["hosts"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.append("")
    lines.append(f"lab {status['name']} in {status['dir']}"
                 + ("" if status["ready"] else " (not fully up)"))
    etcd = status["etcd"]
    if etcd:
        lines.append(f"etcd:     {', '.join(etcd['endpoints'])}  pid {etcd['pid']}  "
                     f"running {_yes(etcd['alive'])}")
    reg = status["registry"]
    if reg:
        lines.append(f"registry: http://{reg['addr']}  pid {reg['pid']}  "
                     f"answers {_yes(reg['answers'])}")
    for m in status["masters"]:
        role = f"  {m['role']}" if m.get("role") else ""
        url = m.get("url") or f"http://{m['listen']}"
        lines.append(f"master:   {url}  pid {m['pid']}  "
                     f"running {_yes(m.get('alive'))}  healthy {_yes(m['healthy'])}{role}")
    if status["image"]:
        lines.append(f"image:    {status['image']}")
    return "\n".join(lines)


def summary(lab: Lab, credentials: str) -> str:
    from sigmad.lab.services import master_url
    from sigmad.lab.trust import engine_url

    def engines(h: Any) -> str:
        return f"{engine_url(h)} (TLS), {h.engine}" if lab.ca else h.engine

    hosts = "\n".join(f"    {h.name}  {h.address}  netns {h.netns}  engine {engines(h)}"
                      for h in lab.hosts)
    trust = (f"  CA:          {lab.ca}   (TLS everywhere: etcd, engines, API; "
             "sigmactl reads it from the credentials)\n") if lab.ca else \
        "  TLS:         off (--no-tls)\n"
    return (
        f"  servers:     {', '.join(master_url(m.listen, lab.ca) for m in lab.masters)}\n"
        f"  token:       {lab.token}\n"
        f"{trust}"
        f"  image:       {lab.image}   (use this ref in app specs)\n"
        + (f"  redis:       {lab.redis_image}   (this host's redis-server)\n"
           if lab.redis_image else "") +
        f"  credentials: {credentials}   (context {lab_context(lab.name)}: "
        "try `sigmactl get nodes`)\n"
        f"  hosts:\n{hosts}\n"
        f"  remove it:   sigmad lab down --name {lab.name}"
    )
