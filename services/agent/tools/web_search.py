"""web_search: a web search API (Tavily, Serper or a SearxNG instance) over the guarded client."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from services.agent.tools.base import (
    Source,
    SourceKind,
    Tool,
    ToolCallContext,
    ToolFailed,
    ToolResult,
)
from services.agent.tools.outbound import OutboundHttp, OutboundRefused

DEFAULT_URLS = {
    "tavily": "https://api.tavily.com/search",
    "serper": "https://google.serper.dev/search",
}


class WebSearchArgs(BaseModel):
    query: str = Field(min_length=1, max_length=400, description="The web search query.")


@dataclass(frozen=True)
class WebSearchSettings:
    provider: str  # tavily | serper | searxng
    url: str | None
    api_key: str | None
    top_k: int
    timeout: float


def _tavily(data: Any) -> list[tuple[str, str, str]]:
    return [(r.get("title", ""), r.get("url", ""), r.get("content", "")) for r in data["results"]]


def _serper(data: Any) -> list[tuple[str, str, str]]:
    return [(r.get("title", ""), r.get("link", ""), r.get("snippet", "")) for r in data["organic"]]


def _searxng(data: Any) -> list[tuple[str, str, str]]:
    return [(r.get("title", ""), r.get("url", ""), r.get("content", "")) for r in data["results"]]


PARSERS: dict[str, Callable[[Any], list[tuple[str, str, str]]]] = {
    "tavily": _tavily,
    "serper": _serper,
    "searxng": _searxng,
}


class WebSearchTool(Tool):
    name = "web_search"
    kind = SourceKind.WEB
    Args: ClassVar[type[BaseModel]] = WebSearchArgs
    guidance_prompt = "tools/web_search_query.j2"

    def __init__(self, http: OutboundHttp, settings: WebSearchSettings) -> None:
        url = settings.url or DEFAULT_URLS.get(settings.provider)
        if url is None:
            raise ValueError(f"web search provider {settings.provider} needs WEB_SEARCH_URL")
        self._http = http
        self._settings = settings
        self._url = url

    async def execute(self, args: BaseModel, call: ToolCallContext) -> ToolResult:
        assert isinstance(args, WebSearchArgs)
        provider, key, n = (
            self._settings.provider,
            self._settings.api_key or "",
            self._settings.top_k,
        )
        try:
            if provider == "tavily":
                data = await self._http.json(
                    "POST",
                    self._url,
                    headers={"Authorization": f"Bearer {key}"},
                    body={"query": args.query, "max_results": n},
                    timeout=self._settings.timeout,
                )
            elif provider == "serper":
                data = await self._http.json(
                    "POST",
                    self._url,
                    headers={"X-API-KEY": key},
                    body={"q": args.query, "num": n},
                    timeout=self._settings.timeout,
                )
            else:
                data = await self._http.json(
                    "GET",
                    self._url,
                    params={"q": args.query, "format": "json"},
                    timeout=self._settings.timeout,
                )
            results = PARSERS[provider](data)
        except OutboundRefused as error:
            raise ToolFailed(str(error)) from error
        except (KeyError, TypeError, AttributeError) as error:
            raise ToolFailed(f"unexpected reply from the {provider} search API") from error
        sources = [
            Source(kind=SourceKind.WEB, title=str(title), url=str(url), text=str(snippet))
            for title, url, snippet in results[:n]
        ]
        return ToolResult(sources, f"{len(sources)} web results")
