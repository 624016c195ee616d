"""Before any data loads or any model trains: can each API model answer at all?

Each distinct `models.*` entry an arm uses is probed once: its `/models` list where the server has one, then
one chat completion of at most one token, with no retries and a short timeout. A server that cannot be
reached, a key it refuses, or a model id it does not know is one line naming the key and what to fix; a
server without `/models` (some gateways) is fine, and anything else (a 429, a 5xx) is left to the run, whose
retries and failed-call limit deal with it.
"""

from __future__ import annotations

import difflib
import os

import openai

from pipeline.errors import UserError
from pipeline.experiment.config import ConfigError, OpenAIModelConfig

PROBE_TIMEOUT_S = 10.0
PROBE_TEXT = "Reply with one word."  # what the probe asks; tests tell its request from the run's by it
_NO_KEY = "not-needed"  # as the backend sends: never the user's OPENAI_API_KEY to a third-party URL


class PreflightError(UserError):
    """An API model cannot answer; phrased as the one line the user sees, naming the model key."""


def check_api_key(spec: OpenAIModelConfig, where: str) -> None:
    """Fail early, in one line naming the variable (never its value), when the key is missing."""
    name = spec.api_key_env
    if name and not os.environ.get(name):
        raise ConfigError(f"{where}.api_key_env: environment variable {name} is not set")


def mask(key: str) -> str:
    """A key as a person can recognise it without it being usable: `sk-…9c3a`."""
    return f"{key[:3]}…{key[-4:]}" if len(key) >= 16 else "***"


def probe_models(models: dict[str, OpenAIModelConfig]) -> None:
    """Probe each API model (keyed by its `models.*` key); raise PreflightError on the first that cannot answer."""
    for name, spec in models.items():
        check_api_key(spec, f"models.{name}")
        Probe(name, spec).run()


class Probe:
    """One API model's preflight: list its server's models, then ask for one token."""

    def __init__(self, name: str, spec: OpenAIModelConfig):
        self.where, self.spec = f"models.{name}", spec
        self.key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        self.timeout = min(spec.timeout_s, PROBE_TIMEOUT_S)
        self.client = openai.OpenAI(base_url=spec.base_url, api_key=self.key or _NO_KEY, timeout=self.timeout,
                                    max_retries=0)

    def run(self) -> None:
        try:
            offered = self.offered_ids()
            if offered is not None and self.spec.model not in offered:
                raise self.unknown_model(offered)
            self.ask_one_token(offered)
        finally:
            self.client.close()

    def offered_ids(self) -> list[str] | None:
        """The ids the server lists, or None where it has no usable `/models` (not an error)."""
        try:
            page = self.client.models.list()
            return [m.id for m in page.data if isinstance(getattr(m, "id", None), str)]
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise self.refused(exc) from None
            return None
        except openai.APIConnectionError as exc:
            raise self.unreachable(exc) from None
        except Exception:  # noqa: BLE001 - an answer that is not a model list: the route is not what we expect
            return None

    def ask_one_token(self, offered: list[str] | None) -> None:
        try:
            self.client.chat.completions.create(model=self.spec.model, max_tokens=1, temperature=0,
                                                messages=[{"role": "user", "content": PROBE_TEXT}])
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise self.refused(exc) from None
            if exc.status_code == 404:
                raise self.unknown_model(offered, exc) from None
        except openai.APIConnectionError as exc:
            if _is_unreachable(exc):
                raise self.unreachable(exc) from None
        except Exception:  # noqa: BLE001 - an odd answer is the run's to count as a failed call
            return

    # --- the lines the user reads ---------------------------------------------------------------

    def unreachable(self, exc: openai.APIConnectionError) -> PreflightError:
        if isinstance(exc, openai.APITimeoutError):
            why = f"no answer within {self.timeout:g} s"
        else:
            why = _cause(exc)
        return PreflightError(f"{self.where}: cannot reach {self.spec.base_url} ({why}); is the server running "
                              "and base_url right?")

    def refused(self, exc: openai.APIStatusError) -> PreflightError:
        said = self._said(exc)
        if not self.spec.api_key_env:
            return PreflightError(f"{self.where}: {self.spec.base_url} answered {exc.status_code} ({said}): it needs "
                                  f"a key; set {self.where}.api_key_env to the NAME of the variable holding it")
        return PreflightError(f"{self.where}: {self.spec.base_url} refused the key in {self.spec.api_key_env} "
                              f"({mask(self.key or '')}) with {exc.status_code} ({said})")

    def unknown_model(self, offered: list[str] | None, exc: openai.APIStatusError | None = None) -> PreflightError:
        model = self.spec.model
        if offered is None:
            return PreflightError(f"{self.where}.model: {self.spec.base_url} answered 404 ({self._said(exc)}) for "
                                  f"model {model!r}; check the model id, and that base_url is the API root "
                                  "(often ending in /v1)")
        close = difflib.get_close_matches(model, offered, n=3, cutoff=0.5)
        listed = ", ".join(offered[:20]) + (f" (+{len(offered) - 20} more)" if len(offered) > 20 else "")
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return PreflightError(f"{self.where}.model: {self.spec.base_url} does not offer {model!r} (it offers: "
                              f"{listed or 'none'}){hint}")

    def _said(self, exc: openai.APIStatusError | None) -> str:
        """The server's own message, on one line, short, the key masked."""
        if exc is None:
            return "not found"
        body = exc.body if isinstance(exc.body, dict) else {}
        said = body.get("message") if isinstance(body.get("message"), str) else exc.message  # not the SDK's dump
        text = " ".join(str(said).split())[:160]
        return text.replace(self.key, mask(self.key)) if self.key else text


def _is_unreachable(exc: openai.APIConnectionError) -> bool:
    """Nothing answered at all (refused, no such host, timed out): not a connection the server dropped mid-answer,
    which the run's retries handle."""
    # By name: the SDK's HTTP library (httpx, or httpx2 in newer SDKs) is its own business.
    return isinstance(exc, openai.APITimeoutError) or type(exc.__cause__).__name__ in ("ConnectError",
                                                                                        "ConnectTimeout")


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__
    text = " ".join(str(cause or exc).split()) or type(cause or exc).__name__
    for plain, said in (("Connection refused", "connection refused"), ("Name or service not known", "no such host"),
                        ("nodename nor servname", "no such host"), ("Temporary failure in name resolution",
                                                                    "no such host")):
        if plain in text:
            return said
    return text[:160]
