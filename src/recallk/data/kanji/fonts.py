"""The fonts of the kanji dataset: the table ``fonts.tsv`` (Debian package, font file), selection by name and the
check that the files are installed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


class KanjiFontsMissingError(FileNotFoundError, ValueError):
    """Font files of the kanji font table are not installed; the message names the Debian packages."""


@dataclass(frozen=True)
class FontEntry:
    """One font of the table: Debian ``package``, font file ``path`` and short ``name`` (file stem)."""

    package: str
    path: str

    @property
    def name(self) -> str:
        return Path(self.path).stem


def font_table() -> list[FontEntry]:
    """The fonts of ``recallk/data/kanji/fonts.tsv`` (package<TAB>font file), in file order."""
    text = resources.files(__package__).joinpath("fonts.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [FontEntry(package.strip(), path.strip()) for package, path in rows]


def select_fonts(fonts: Sequence[str] | None = None) -> list[FontEntry]:
    """Fonts by name (file stem, e.g. ``"ipag"``), file name, full path or Debian package (all its files).

    Raises:
        ValueError: an unknown font, listing the valid names.
    """
    table = font_table()
    if fonts is None:
        return table
    if isinstance(fonts, str):
        fonts = [fonts]
    chosen: list[FontEntry] = []
    for want in fonts:
        hits = [e for e in table if want in (e.name, Path(e.path).name, e.path, e.package)]
        if not hits:
            raise ValueError(f"unknown kanji font {want!r}; choose from {[e.name for e in table]}")
        chosen += [e for e in hits if e not in chosen]
    return chosen


def check_fonts_installed(fonts: Sequence[FontEntry]) -> None:
    """Raise KanjiFontsMissingError naming the Debian packages whose font files are missing."""
    missing = [e for e in fonts if not Path(e.path).is_file()]
    if missing:
        packages = sorted({e.package for e in missing})
        files = ", ".join(e.path for e in missing)
        raise KanjiFontsMissingError(
            f"kanji dataset: {len(missing)} font file(s) missing ({files}). Install them with `make setup` or "
            f"`sudo apt-get install -y {' '.join(packages)}`, or pick installed fonts with the fonts= option."
        )
