"""The A2A Agent Card (GET /.well-known/agent-card.json): what another agent reads to call
ours. Made from the settings alone, so every operations server (any process of a mesh)
serves the same card: the two interfaces at PUBLIC_URL (gRPC and HTTP+JSON, both through
Envoy), the bearer scheme (an access token or an API key, the one credential path), and
a skill per intent of the agent's intent examples (prompts/agent/intent_examples.yaml)."""

from importlib import metadata

from a2a.types import a2a_pb2 as a2a
from google.protobuf.json_format import MessageToDict

from server.config import Settings
from server.envoy import reachable
from services.agent.intents import EXAMPLES_FILE
from services.agent.prompts import PromptManager

PROTOCOL_VERSION = "1.0"
BEARER = "bearer"
# What the agent reads and writes: questions and answers as text.
TEXT = ["text/plain"]


def public_url(settings: Settings) -> str:
    """Where clients reach Envoy: PUBLIC_URL, else the listener's own address."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = reachable(settings.http_host)
    return f"http://{'localhost' if host == '127.0.0.1' else host}:{settings.http_port}"


def _skills(settings: Settings) -> list[a2a.AgentSkill]:
    intents = PromptManager(settings.prompts_dir).data(EXAMPLES_FILE)
    return [
        a2a.AgentSkill(
            id=name,
            name=name.replace("_", " "),
            description=spec["description"],
            tags=[name],
            examples=spec["examples"][:3],
        )
        for name, spec in intents.items()
    ]


def agent_card(settings: Settings) -> a2a.AgentCard:
    url = public_url(settings)
    return a2a.AgentCard(
        name="agentmesh",
        description=(
            "A self-hosted AI agent: answers questions from the caller's own documents, the "
            "web and configured tools, citing its sources; each message starts a task (a run)."
        ),
        version=metadata.version("agentmesh"),
        supported_interfaces=[
            # A gRPC target is host:port (Envoy passes gRPC through on the same port).
            a2a.AgentInterface(
                url=url.split("://", 1)[-1],
                protocol_binding="GRPC",
                protocol_version=PROTOCOL_VERSION,
            ),
            a2a.AgentInterface(
                url=url, protocol_binding="HTTP+JSON", protocol_version=PROTOCOL_VERSION
            ),
        ],
        capabilities=a2a.AgentCapabilities(
            streaming=True, push_notifications=False, extended_agent_card=False
        ),
        security_schemes={
            BEARER: a2a.SecurityScheme(
                http_auth_security_scheme=a2a.HTTPAuthSecurityScheme(
                    scheme="Bearer",
                    description="An agentmesh access token (Login) or API key.",
                )
            )
        },
        security_requirements=[a2a.SecurityRequirement(schemes={BEARER: a2a.StringList()})],
        default_input_modes=TEXT,
        default_output_modes=TEXT,
        skills=_skills(settings),
    )


def agent_card_json(settings: Settings) -> dict[str, object]:
    """The card as A2A's JSON (ProtoJSON: camelCase field names)."""
    return MessageToDict(agent_card(settings))
