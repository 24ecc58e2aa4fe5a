"""api_search: a configurable external HTTP API (endpoint, auth header, query template,
result field mapping), called through the guarded client."""

import json
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

from pydantic import BaseModel, Field

from services.agent.tools.base import (
    ALL_ROLES,
    Source,
    SourceKind,
    Tool,
    ToolCallContext,
    ToolFailed,
    ToolResult,
)
from services.agent.tools.outbound import OutboundHttp, OutboundRefused
from services.auth.principal import Role


class ApiSearchArgs(BaseModel):
    query: str = Field(
        min_length=1, max_length=400, description="What to look up: an identifier or keywords."
    )


@dataclass(frozen=True)
class ApiToolSettings:
    url: str  # with {query}
    method: str
    body_template: str | None  # JSON with {query}
    auth_header: str
    auth_value: str | None
    results_path: str
    title_field: str
    url_field: str
    snippet_field: str
    description: str
    admin_only: bool
    top_k: int
    timeout: float


def _at_path(data: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _field(record: Any, name: str) -> str:
    value = _at_path(record, name) if name else ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class ApiSearchTool(Tool):
    name = "api_search"
    kind = SourceKind.API
    Args: ClassVar[type[BaseModel]] = ApiSearchArgs
    guidance_prompt = "tools/api_query_builder.j2"

    def __init__(self, http: OutboundHttp, settings: ApiToolSettings) -> None:
        self._http = http
        self._settings = settings
        self.roles = frozenset({Role.ADMIN}) if settings.admin_only else ALL_ROLES

    def prompt_variables(self) -> dict[str, object]:
        return {"description": self._settings.description}

    async def execute(self, args: BaseModel, call: ToolCallContext) -> ToolResult:
        assert isinstance(args, ApiSearchArgs)
        s = self._settings
        url = s.url.replace("{query}", quote(args.query, safe=""))
        body = None
        if s.body_template is not None:
            # json.dumps of the query, quotes stripped, is the query as a JSON string's inside.
            body = json.loads(s.body_template.replace("{query}", json.dumps(args.query)[1:-1]))
        headers = {s.auth_header: s.auth_value} if s.auth_value else {}
        try:
            data = await self._http.json(
                s.method, url, headers=headers, body=body, timeout=s.timeout
            )
            records = _at_path(data, s.results_path)
            if not isinstance(records, list):
                records = [records]
            sources = [
                Source(
                    kind=SourceKind.API,
                    title=_field(r, s.title_field),
                    url=_field(r, s.url_field) if s.url_field else "",
                    text=_field(r, s.snippet_field),
                )
                for r in records[: s.top_k]
            ]
        except OutboundRefused as error:
            raise ToolFailed(str(error)) from error
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise ToolFailed(
                "the external API's reply does not match the configured fields"
            ) from error
        return ToolResult(sources, f"{len(sources)} records")
