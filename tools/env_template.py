"""Write the env files for docker compose (.env.example, deploy/env/*.env) from
server.config.Settings and docker-compose.yml; a test checks the committed files are
exactly this output, so a new setting or compose variable cannot be left out.

    python -m tools.env_template              # rewrite every template
    python -m tools.env_template production   # print one

Every Settings field appears in every template: set, or commented out with its default.
Secrets the stack cannot start without are the placeholder `change-me`. The JWT secret
and the administrator's password stay commented out: unset, agentmesh generates strong
ones into its data volume, which is safer than a placeholder someone forgets to replace.
"""

import sys
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic_core import PydanticUndefined

from server.config import ROOT, Settings

COMPOSE_FILE = ROOT / "docker-compose.yml"
PREFIX = str(Settings.model_config.get("env_prefix", ""))
PLACEHOLDER = "change-me"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
WIDTH = 92

# The variables docker-compose.yml reads (besides AGENTMESH_* ones): description and the
# value compose falls back to ("" for none).
STACK_VARIABLES: dict[str, tuple[str, str]] = {
    "POSTGRES_USER": ("PostgreSQL user agentmesh connects as; created on the first start.", ""),
    "POSTGRES_PASSWORD": (
        "Its password (required). Letters, digits, - and _ only: it goes into a URL.",
        "",
    ),
    "POSTGRES_DB": ("PostgreSQL database of agentmesh; created on the first start.", ""),
    "REDIS_PASSWORD": (
        "Redis password (required). Letters, digits, - and _ only: it goes into a URL.",
        "",
    ),
    "QDRANT_API_KEY": ("API key of the Qdrant server (required).", ""),
    "GRAFANA_ADMIN_USER": ("Grafana administrator's user name.", "admin"),
    "GRAFANA_ADMIN_PASSWORD": ("Grafana administrator's password (required).", ""),
    "IMAGE_TAG": (
        "Tag of the images compose builds (agentmesh, -envoy, -local-llm); the default is "
        "the project's version.",
        VERSION,
    ),
    "BACKEND_SUBNET": (
        "Address range of the internal backend network; agentmesh trusts x-forwarded-for "
        "only from it (Envoy). Change it if it clashes with a network of the host.",
        "172.29.0.0/24",
    ),
    "ENV_FILE": (
        "The env file the containers read (this file, once copied to .env). Set it in the "
        "shell to use another: ENV_FILE=x.env docker compose --env-file x.env up -d",
        ".env",
    ),
    "COMPOSE_PROFILES": (
        "Optional services: local-llm adds a local model server (llama.cpp, Gemma 3 270M; "
        "its image compiles llama.cpp, minutes). Point AGENTMESH_LLM_BASE_URL at it.",
        "",
    ),
}

STACK_SECRETS = {
    "POSTGRES_PASSWORD": PLACEHOLDER,
    "REDIS_PASSWORD": PLACEHOLDER,
    "QDRANT_API_KEY": PLACEHOLDER,
    "GRAFANA_ADMIN_PASSWORD": PLACEHOLDER,
}
STACK_NAMES = {"POSTGRES_USER": "agentmesh", "POSTGRES_DB": "agentmesh"}
LOCAL_LLM = {
    "COMPOSE_PROFILES": "local-llm",
    f"{PREFIX}LLM_BASE_URL": "http://local-llm:8000/v1",
    f"{PREFIX}LLM_MODEL": "gemma3-270m",
}

# What a setting means in the stack beyond its description.
GENERATED = (
    " Left unset on purpose: the generated one, kept in the agentmesh_data volume, is "
    "stronger than a placeholder left in place."
)
COMPOSE_NOTES = {
    f"{PREFIX}CORS_ALLOWED_ORIGINS": (
        " In compose it is built into the Envoy image: after a change, docker compose up "
        "-d --build."
    ),
    f"{PREFIX}JWT_SECRET": GENERATED + " Replicas that share a database need one value.",
    f"{PREFIX}ADMIN_PASSWORD": GENERATED + " Read it with: docker compose exec agentmesh "
    "cat /data/initial-admin-password",
    f"{PREFIX}INGEST_WORKERS": (
        " In compose the serving containers run no jobs (docker-compose.yml sets 0 for them): "
        "this is what each `worker` container runs at once."
    ),
    f"{PREFIX}KNOWLEDGE_TARGET": " Set by docker-compose.yml for `agentmesh` (Envoy).",
    f"{PREFIX}INDEX_TARGET": " Set by docker-compose.yml for `agentmesh` (`knowledge`).",
    f"{PREFIX}ENVOY_UPSTREAMS": (
        " In compose docker-compose.yml passes it to the Envoy image's build, with "
        "ENVOY_OPS_UPSTREAMS."
    ),
    f"{PREFIX}LLM_PROVIDER": (
        " In compose, `local` needs the local-llm extra, which the image leaves out: use the "
        "local-llm service instead (COMPOSE_PROFILES)."
    ),
}


@dataclass(frozen=True)
class Template:
    path: str
    title: str
    intro: str
    values: dict[str, str]
    """Variables set in the file."""
    examples: dict[str, str] = field(default_factory=dict)
    """Variables left commented out, shown with this value instead of the default."""


def _hosted(host: str) -> dict[str, str]:
    """What staging and production set beyond the stack's secrets."""
    return {
        f"{PREFIX}ADMIN_EMAIL": f"admin@{host}",
        f"{PREFIX}CORS_ALLOWED_ORIGINS": f"https://{host}",
        f"{PREFIX}LLM_BASE_URL": "https://api.openai.com/v1",
        f"{PREFIX}LLM_API_KEY": PLACEHOLDER,
        # Load balancers get time to see NOT_SERVING before the port closes.
        f"{PREFIX}SHUTDOWN_DELAY_SECONDS": "5",
    }


TEMPLATES = {
    "example": Template(
        ".env.example",
        "agentmesh: settings of the docker compose stack.",
        "Copy to .env, replace every change-me, then: docker compose up -d --build. "
        "deploy/env/ holds variants for development, staging and production.",
        {**STACK_NAMES, **STACK_SECRETS},
        LOCAL_LLM,
    ),
    "development": Template(
        "deploy/env/development.env",
        "agentmesh: development settings for docker compose.",
        "Copy to .env at the repository root and replace every change-me. Readable logs; "
        "answers fall back to extractive ones when the model fails. For a local model, "
        "uncomment COMPOSE_PROFILES, AGENTMESH_LLM_BASE_URL and AGENTMESH_LLM_MODEL below.",
        {
            **STACK_NAMES,
            **STACK_SECRETS,
            f"{PREFIX}LOG_FORMAT": "text",
            f"{PREFIX}LLM_FALLBACK_EXTRACTIVE": "true",
        },
        LOCAL_LLM,
    ),
    "staging": Template(
        "deploy/env/staging.env",
        "agentmesh: staging settings for docker compose.",
        "Copy to .env on the staging host (keep it out of git) and replace every change-me "
        "and example.com. Strong values: openssl rand -hex 32.",
        {
            **STACK_NAMES,
            **STACK_SECRETS,
            **_hosted("staging.example.com"),
            f"{PREFIX}LLM_FALLBACK_EXTRACTIVE": "true",
        },
        LOCAL_LLM,
    ),
    "production": Template(
        "deploy/env/production.env",
        "agentmesh: production settings for docker compose.",
        "Copy to .env on the production host (keep it out of git) and replace every "
        "change-me and example.com. Strong values: openssl rand -hex 32.",
        {**STACK_NAMES, **STACK_SECRETS, **_hosted("example.com")},
    ),
}


def compose_settings() -> set[str]:
    """The AGENTMESH_* variables docker-compose.yml sets for every container of the
    agentmesh image (they win); COMPOSE_NOTES tells of those it sets for some."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    image = services["agentmesh"]["image"]
    return set.intersection(
        *(set(spec["environment"]) for spec in services.values() if spec.get("image") == image)
    )


def setting_default(name: str) -> str:
    """A Settings field's default as an env file writes it ("" when unset)."""
    info = Settings.model_fields[name]
    value: Any
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        value = None
    else:
        value = info.default
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    if isinstance(value, Path) and value.is_absolute() and value.is_relative_to(ROOT):
        return str(value.relative_to(ROOT))
    return str(value)


def _comment(text: str) -> list[str]:
    return textwrap.wrap(
        text, WIDTH - 2, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
    )


def _entry(template: Template, name: str, description: str, default: str) -> list[str]:
    lines = _comment(description)
    if name in template.values:
        lines.append(f"{name}={template.values[name]}")
    else:
        lines.append(f"# {name}={template.examples.get(name, default)}")
    return lines


def render(key: str) -> str:
    """The text of one template."""
    template = TEMPLATES[key]
    fixed = compose_settings()
    lines = [
        *_comment(template.title),
        *_comment(template.intro),
        "#",
        *_comment(
            "Written by `python -m tools.env_template` from server/config.py and "
            "docker-compose.yml. A commented-out line shows the default."
        ),
        "",
        "# ---- The compose stack (docker-compose.yml) ----",
    ]
    for name, (description, default) in STACK_VARIABLES.items():
        lines += ["", *_entry(template, name, description, default)]
    lines += ["", f"# ---- agentmesh (server/config.py; every {PREFIX}* variable) ----"]
    for field_name, info in Settings.model_fields.items():
        name = f"{PREFIX}{field_name.upper()}"
        description = info.description or ""
        if name in fixed:
            description += " Set by docker-compose.yml, which overrides this file."
        description += COMPOSE_NOTES.get(name, "")
        lines += ["", *_entry(template, name, description, setting_default(field_name))]
    return "\n".join(lines) + "\n"


def write_all() -> None:
    for key, template in TEMPLATES.items():
        path = ROOT / template.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(key))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(render(sys.argv[1]), end="")
    else:
        write_all()
