"""The price catalog: shipped catalog.json, overlaid by a user's LiteLLM-format JSON file."""

from __future__ import annotations

import datetime
import difflib
import json
from dataclasses import dataclass
from pathlib import Path

SHIPPED = Path(__file__).with_name("catalog.json")
_PER_MTOK = {  # LiteLLM per-token field -> TokenPrices per-million-token field
    "input_cost_per_token": "input_usd_per_mtok", "output_cost_per_token": "output_usd_per_mtok",
    "cache_read_input_token_cost": "cached_input_usd_per_mtok",
    "cache_creation_input_token_cost": "cache_write_usd_per_mtok",
    "input_cost_per_token_batches": "batch_input_usd_per_mtok",
    "output_cost_per_token_batches": "batch_output_usd_per_mtok", "training_cost_per_token": "training_usd_per_mtok",
}
_NUMBERS = (*_PER_MTOK, "prompt_cache_min_tokens", "cache_min_prefix_tokens", "usd_per_hour")
DEFAULT_CACHE_MIN_PREFIX_TOKENS = 1024  # OpenAI's minimum; used where a row names none


class CatalogError(ValueError):
    """A name the catalog lacks, or a catalog file it cannot use."""


@dataclass(frozen=True)
class TokenPrices:
    """USD per million tokens (LiteLLM's per-token costs x 1e6); None where the provider has no such rate."""

    input_usd_per_mtok: float
    output_usd_per_mtok: float
    cached_input_usd_per_mtok: float | None
    cache_write_usd_per_mtok: float | None
    batch_input_usd_per_mtok: float | None
    batch_output_usd_per_mtok: float | None
    training_usd_per_mtok: float | None
    cache_min_prefix_tokens: int
    source: str
    date: str
    provider: str | None = None
    deprecation_date: str | None = None


@dataclass(frozen=True)
class Hardware:
    """An on-demand machine price, USD per hour."""

    name: str
    usd_per_hour: float
    source: str
    date: str


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CatalogError(f"{path}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CatalogError(f"{path}: not JSON ({e})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a JSON object of model name -> fields, got {type(data).__name__}")
    return data


def _check(rows: dict, path: Path) -> None:
    for key, row in rows.items():
        if not isinstance(row, dict):
            raise CatalogError(f"{path}: row {key!r} is not a JSON object")
        for field in _NUMBERS:
            v = row.get(field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise CatalogError(f"{path}: row {key!r} field {field!r} is not a number: {v!r}")
            if v is not None and v < 0:
                raise CatalogError(f"{path}: row {key!r} field {field!r} is negative: {v!r}")
        if "alias_of" in row and not isinstance(row["alias_of"], str):
            raise CatalogError(f"{path}: row {key!r} field 'alias_of' is not a model name: {row['alias_of']!r}")


class Catalog:
    """Model token prices and hardware presets by name; see load_catalog."""

    def __init__(self, models: dict, hardware: dict, origin: dict[str, Path], files: list[Path]):
        self._models, self._hardware, self._origin, self.files = models, hardware, origin, files

    def names(self) -> list[str]:
        """Model names, sorted (hardware presets: hardware_names)."""
        return sorted(self._models)

    def hardware_names(self) -> list[str]:
        """Hardware preset names, sorted."""
        return sorted(self._hardware)

    def _row(self, rows: dict, name: str, kind: str) -> dict:
        if name not in rows:
            close = ", ".join(difflib.get_close_matches(name, list(rows), n=5)) or "none"
            files = ", ".join(map(str, self.files))
            raise CatalogError(f"unknown {kind} {name!r} in {files}; close matches: {close}".replace("\n", " "))
        return rows[name]

    def tokens(self, name: str) -> TokenPrices:
        """Token prices of a model (LiteLLM aliases, rows with alias_of, are followed)."""
        row, seen = self._row(self._models, name, "model"), [name]
        while "alias_of" in row:
            if row["alias_of"] in seen:
                raise CatalogError(f"{self._origin[name]}: alias loop {' -> '.join([*seen, row['alias_of']])}")
            seen.append(row["alias_of"])
            row = self._row(self._models, row["alias_of"], "model")
        for field in ("input_cost_per_token", "output_cost_per_token"):
            if row.get(field) is None:
                raise CatalogError(f"{self._origin[seen[-1]]}: row {seen[-1]!r} has no {field!r}")
        per_mtok = {ours: None if row.get(f) is None else round(row[f] * 1e6, 10) for f, ours in _PER_MTOK.items()}
        cmin = next((row[f] for f in ("cache_min_prefix_tokens", "prompt_cache_min_tokens") if row.get(f) is not None),
                    DEFAULT_CACHE_MIN_PREFIX_TOKENS)
        return TokenPrices(**per_mtok, cache_min_prefix_tokens=int(cmin), source=row["source"], date=row["date"],
                           provider=row.get("litellm_provider"), deprecation_date=row.get("deprecation_date"))

    def hardware(self, name: str) -> Hardware:
        """An hourly hardware preset, e.g. 't4'."""
        row = self._row(self._hardware, name, "hardware preset")
        if row.get("usd_per_hour") is None:
            raise CatalogError(f"{self._origin[name]}: row {name!r} has no 'usd_per_hour'")
        return Hardware(name, float(row["usd_per_hour"]), row["source"], row["date"])


def load_catalog(user_file: Path | None = None) -> Catalog:
    """The shipped catalog, overlaid by user_file: LiteLLM's format (model name -> LiteLLM fields; a row
    with usd_per_hour is a hardware preset). User rows replace shipped ones whole; one without source/date
    gets the file's path and modification date."""
    shipped = _read(SHIPPED)
    models, hardware = dict(shipped["models"]), dict(shipped["hardware"])
    for rows in (models, hardware):
        _check(rows, SHIPPED)
    origin, files = {name: SHIPPED for name in (*models, *hardware)}, [SHIPPED]
    if user_file is not None:
        rows = _read(user_file := Path(user_file))
        rows.pop("sample_spec", None)  # LiteLLM's own file documents its fields in this row
        _check(rows, user_file)
        mtime = datetime.date.fromtimestamp(user_file.stat().st_mtime).isoformat()
        for name, row in rows.items():
            row = {"source": str(user_file), "date": mtime, **row}
            (hardware if "usd_per_hour" in row else models)[name] = row
            origin[name] = user_file
        files.append(user_file)
    return Catalog(models, hardware, origin, files)
