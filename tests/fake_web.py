"""A local stand-in for the outside web: a SearxNG-style search API and a records API,
on real sockets, recording what they were asked."""

from typing import Any

from aiohttp import web

from tests.local_http import LocalHttpServer

JSON = dict[str, Any]


class FakeWeb(LocalHttpServer):
    def __init__(self) -> None:
        super().__init__()
        self.searches: list[str] = []
        self.lookups: list[JSON] = []
        self.search_status = 200

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/search", self._search)
        app.router.add_get("/records", self._records)
        app.router.add_get("/redirect", self._redirect)

    async def _search(self, request: web.Request) -> web.Response:
        query = request.query.get("q", "")
        self.searches.append(query)
        if self.search_status != 200:
            return web.json_response({"error": "down"}, status=self.search_status)
        slug = "-".join(query.lower().split())
        return web.json_response(
            {
                "query": query,
                "results": [
                    {
                        "title": f"Result {n} for {query}",
                        "url": f"https://news.example.org/{slug}/{n}",
                        "content": f"Snippet {n}: the latest on {query}.",
                    }
                    for n in (1, 2, 3)
                ],
            }
        )

    async def _records(self, request: web.Request) -> web.Response:
        self.lookups.append(
            {"q": request.query.get("q", ""), "auth": request.headers.get("X-Api-Key", "")}
        )
        return web.json_response(
            {
                "data": {
                    "items": [
                        {
                            "name": f"Order {request.query.get('q', '')}",
                            "link": "https://records.example.org/orders/1",
                            "summary": {"status": "shipped", "carrier": "DHL"},
                        }
                    ]
                }
            }
        )

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query.get("to", "/"))
