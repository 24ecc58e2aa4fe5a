"""The prompt manager: every prompt is a Jinja2 file under prompts/, loaded once and
rendered with variables; `reload()` (SIGHUP) re-reads them, and `auto_reload` re-reads a
file that changed on disk (development)."""

import re
import threading
from pathlib import Path
from typing import Any

import jinja2
import yaml

# What would end a fence early or open a new one: the tags the templates fence data with.
_FENCE_TAGS = re.compile(r"</?\s*(source|history|message)\b[^>]*>", re.IGNORECASE)


def fence(value: object) -> str:
    """`value` unable to open or close a `<source>`, `<history>` or `<message>` fence (the
    tag's angle brackets become look-alike quotation marks)."""
    return _FENCE_TAGS.sub(
        lambda match: match.group(0).replace("<", "\u2039").replace(">", "\u203a"), str(value)
    )


class PromptManager:
    """Renders the templates under `root`; a missing variable is an error, not ''."""

    def __init__(self, root: Path, *, auto_reload: bool = False) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(root),
            undefined=jinja2.StrictUndefined,
            auto_reload=auto_reload,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            autoescape=False,  # prompts are plain text for a model, never HTML
        )
        self._env.filters["fence"] = fence
        self._data: dict[str, Any] = {}
        self.reload()

    @property
    def root(self) -> Path:
        return self._root

    def names(self) -> list[str]:
        """Every template under the root, as render() names them."""
        return sorted(self._env.list_templates(extensions=["j2"]))

    def render(self, name: str, **variables: Any) -> str:
        """The prompt `name` (e.g. "agent/system.j2") rendered with `variables`, stripped."""
        return self._env.get_template(name).render(**variables).strip()

    def data(self, name: str) -> Any:
        """A YAML data file beside the prompts (e.g. "agent/intent_examples.yaml")."""
        with self._lock:
            if name not in self._data:
                self._data[name] = yaml.safe_load((self._root / name).read_text())
            return self._data[name]

    def reload(self) -> None:
        """Forget every loaded template and data file, then load and compile all again
        (a syntax error raises here, at start-up or on SIGHUP, not in a user's request)."""
        with self._lock:
            self._env.cache.clear() if self._env.cache is not None else None
            self._data.clear()
        for name in self.names():
            self._env.get_template(name)
