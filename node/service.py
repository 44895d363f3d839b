"""A systemd unit that runs a provider for months: restarted when it fails, stopped with
SIGTERM (a clean stop, exit 0), logs to the journal, writes only under its home."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

UNIT = """\
[Unit]
Description=idlemesh provider ({home})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={exec_start}
WorkingDirectory={home}
Environment=PYTHONUNBUFFERED=1
# SIGTERM: the provider finishes its jobs' bookkeeping and exits 0.
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=on-failure
RestartSec=5
NoNewPrivileges=yes
PrivateTmp=yes
{sandbox}
[Install]
WantedBy={wanted_by}
"""


def idlemesh_command() -> list[str]:
    """The console script beside this interpreter (a venv's), else `python -m node.cli`."""
    script = Path(sys.executable).parent / "idlemesh"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "node.cli"]


def render_unit(home: Path, *, system: bool) -> str:
    exec_start = shlex.join([*idlemesh_command(), "provider", "run", "--home", str(home)])
    # A system unit sees the file system read-only except its home and the model cache.
    sandbox = (f"ProtectSystem=strict\nReadWritePaths={home}\nProtectHome=read-only\n"
               f"ReadWritePaths=-{Path.home() / '.cache' / 'idlemesh'}\n") if system else ""
    return UNIT.format(home=home, exec_start=exec_start, sandbox=sandbox,
                       wanted_by="multi-user.target" if system else "default.target")


def install_service(home: Path, *, system: bool, name: str, out: Path | None = None) -> tuple[Path, str, str]:
    """Write the unit; returns (path, unit text, the commands that enable it)."""
    from .identity import prepare_home

    prepare_home(home)  # the unit's WorkingDirectory must exist, and be writable, before it starts
    unit = render_unit(home, system=system)
    if out is None:
        base = Path("/etc/systemd/system") if system else \
            Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"
        out = base / f"{name}.service"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(unit)
    ctl = "systemctl" if system else "systemctl --user"
    return out, unit, f"{ctl} daemon-reload && {ctl} enable --now {out.stem}"
