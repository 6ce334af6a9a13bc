"""What a moma-fl app bundle (FAB) is, written by the coordinator and checked by every site.

The bundle holds no code: only ``pyproject.toml`` naming the installed package's components,
publisher ``moma-fl`` and the installed version (plus Flower's ``.info/CONTENT`` manifest).
"""

from __future__ import annotations

import io
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, version

#: The app components: this package's ServerApp and ClientApp.
COMPONENTS = {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}
PUBLISHER = "moma-fl"
ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})


class AppRefused(RuntimeError):
    """The app bundle is not this site's installed moma-fl."""


def installed_version() -> str:
    try:
        return version("moma-fl")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0+unknown"


def check_fab(content: bytes) -> None:
    """Raise :class:`AppRefused` unless ``content`` is a code-free moma-fl app bundle."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            names = set(zf.namelist())
            extra = sorted(names - ALLOWED_FILES)
            if extra:
                raise AppRefused(f"the app bundle carries files of its own ({len(extra)}, "
                                 f"e.g. {extra[0][:80]!r}); a site runs only its installed "
                                 "moma-fl")
            if "pyproject.toml" not in names:
                raise AppRefused("the app bundle has no pyproject.toml")
            project = tomllib.loads(zf.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AppRefused(f"the app bundle is not a readable Flower app ({type(exc).__name__})"
                         ) from None
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    if app.get("components") != COMPONENTS:
        raise AppRefused(f"the app names other components than moma-fl's: "
                         f"{str(app.get('components'))[:200]}")
    if app.get("publisher") != PUBLISHER:
        raise AppRefused(f"the app's publisher is {str(app.get('publisher'))[:80]!r}, not "
                         f"{PUBLISHER!r}")
    theirs, ours = str(project.get("project", {}).get("version")), installed_version()
    if theirs != ours:
        raise AppRefused(f"the app is for moma-fl {theirs[:40]}, this site runs {ours}")
