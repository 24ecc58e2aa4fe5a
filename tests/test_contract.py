"""The contract: protos lint clean, are formatted, don't break main, gen/ and the Envoy
config match them, and google.api.field_behavior says what the server does with each field."""

import ast
import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor, descriptor_pool

from server.config import ROOT, Settings
from server.envoy import EnvoyAddresses, render_config
from server.main import SERVICE_NAMES
from tools import check_breaking, check_generated, copy_googleapis

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _tools_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # buf runs `python` and the protoc plugins from the virtualenv.
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)


def test_buf_lint() -> None:
    result = run("buf", "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format() -> None:
    result = run("buf", "format", "--diff", "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_changes_against_the_release() -> None:
    against = check_breaking.baseline()
    assert against is not None, "HEAD has no release tag and no parent to compare with"
    if not check_breaking.has_protos(against):
        pytest.skip(f"{against} has no protos: nothing to compare against")
    result = check_breaking.breaking(against)
    assert result.returncode == 0, result.stdout + result.stderr


def _clone(tmp_path: Path) -> Path:
    """A clone of this repository's HEAD (on its branch, as CI's clone of main is), with the
    googleapis module buf needs and a git identity for commits."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-local", str(ROOT), str(clone)], check=True)
    for key, value in (("user.email", "ci@agentmesh.test"), ("user.name", "ci")):
        subprocess.run(["git", "config", key, value], cwd=clone, check=True)
    copy_googleapis.copy(clone / "build" / "third_party")
    return clone


def _commit_all(clone: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A", "protos"], cwd=clone, check=True)
    subprocess.run(
        ["git", "commit", "--quiet", "--allow-empty", "-m", message], cwd=clone, check=True
    )


def _drop_field(clone: Path) -> str:
    """Remove the first one-line field of message User; return its name."""
    proto = clone / "protos" / "agentmesh" / "auth" / "v1" / "user.proto"
    lines = proto.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("message User "))
    at = next(i for i in range(at + 1, len(lines)) if re.match(r"\s+\w[\w.]* \w+ = \d+;", lines[i]))
    name = lines[at].split("=")[0].split()[-1]
    proto.write_text("".join(lines[:at] + lines[at + 1 :]))
    return name


def test_a_breaking_change_fails_against_the_previous_commit(tmp_path: Path) -> None:
    """With no release tag, the baseline is the commit before: a commit removing a field
    fails the check, and names the field."""
    clone = _clone(tmp_path)
    tags = subprocess.run(["git", "tag"], cwd=clone, capture_output=True, text=True, check=True)
    for tag in tags.stdout.split():
        subprocess.run(["git", "tag", "-d", tag], cwd=clone, capture_output=True, check=True)
    _commit_all(clone, "the contract as it is")
    kept = check_breaking.resolve(clone, "HEAD")
    field = _drop_field(clone)
    _commit_all(clone, "drop a field")
    against = check_breaking.baseline(clone)
    assert against is not None and against == kept
    result = check_breaking.breaking(against, clone)
    assert result.returncode != 0
    assert f'"{field}"' in result.stdout + result.stderr


def test_a_change_breaking_the_release_fails_commits_later(tmp_path: Path) -> None:
    """A release tag is the baseline: removing a released field fails even after further
    commits, and a field added after the release is not held to it."""
    clone = _clone(tmp_path)
    subprocess.run(["git", "tag", "v99.0.0"], cwd=clone, check=True)
    proto = clone / "protos" / "agentmesh" / "auth" / "v1" / "user.proto"
    released = proto.read_text()
    proto.write_text(
        released.replace("message User {", "message User {\n  string nickname = 99;", 1)
    )
    _commit_all(clone, "add a field after the release")
    proto.write_text(released)
    _commit_all(clone, "and take it back")
    assert check_breaking.baseline(clone) == check_breaking.resolve(clone, "v99.0.0")
    assert check_breaking.breaking("v99.0.0", clone).returncode == 0
    field = _drop_field(clone)
    _commit_all(clone, "drop a released field")
    _commit_all(clone, "something else")
    result = check_breaking.breaking(check_breaking.baseline(clone) or "", clone)
    assert result.returncode != 0
    assert f'"{field}"' in result.stdout + result.stderr


def test_generated_code_is_fresh() -> None:
    assert check_generated.stale_files() == [], "gen/ is stale: run `make gen` and commit it"


def test_every_rpc_has_a_rest_mapping() -> None:
    pool = descriptor_pool.Default()
    for name in SERVICE_NAMES:
        for method in pool.FindServiceByName(name).methods:
            rule: http_pb2.HttpRule = method.GetOptions().Extensions[annotations_pb2.http]  # type: ignore[index]
            assert rule.WhichOneof("pattern"), f"{name}.{method.name} has no google.api.http rule"


def _validate_envoy(config_path: Path) -> subprocess.CompletedProcess[str]:
    return run(Settings().resolved_envoy_binary, "--mode", "validate", "-c", str(config_path))


def test_envoy_config_validates() -> None:
    result = _validate_envoy(ROOT / "envoy" / "envoy.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_sidecar_config_validates(tmp_path: Path) -> None:
    template = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    addresses = EnvoyAddresses(
        listen_host="0.0.0.0",
        listen_port=18080,
        admin_port=19901,
        grpc_host="0.0.0.0",
        grpc_port=15051,
        ops_host="127.0.0.1",
        ops_port=19464,
        descriptor_set=ROOT / "gen" / "agentmesh.binpb",
        cors_origins=["https://app.example.com"],
    )
    rendered = render_config(template, addresses)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(rendered))
    result = _validate_envoy(path)
    assert result.returncode == 0, result.stdout + result.stderr
    clusters = {c["name"]: c for c in rendered["static_resources"]["clusters"]}
    grpc_address = clusters["agentmesh_grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert grpc_address["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 15051,
    }


def test_envoy_transcodes_every_service() -> None:
    config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    transcoder = next(
        f for f in manager["http_filters"] if f["name"].endswith("grpc_json_transcoder")
    )
    assert transcoder["typed_config"]["services"] == SERVICE_NAMES


# The request fields without which the server refuses a call, read off the servicers in
# server/servicers/ and the domain checks they call. REQUIRED must mark exactly these: a field
# the server accepts empty (QueryRequest.conversation_id starts a new conversation, an empty
# UpdateUserRequest.update_mask means the fields set in `user`) is not required.
REQUIRED_FIELDS = {
    # services/auth/service.py register(): normalize_email "is required"; an empty password
    # fails password_problems (at least 10 characters).
    "agentmesh.auth.v1.RegisterRequest": {"email", "password"},
    # login(): "is required" on each.
    "agentmesh.auth.v1.LoginRequest": {"email", "password"},
    # refresh(): "is required".
    "agentmesh.auth.v1.RefreshTokenRequest": {"refresh_token"},
    # change_password(): an empty current password is refused as wrong (PERMISSION_DENIED,
    # not INVALID_ARGUMENT, but never accepted); an empty new one fails password_problems.
    "agentmesh.auth.v1.ChangePasswordRequest": {"current_password", "new_password"},
    # services/auth/users.py require_user_id(): "must be a UUID" (on `user.user_id`).
    "agentmesh.auth.v1.GetUserRequest": {"user_id"},
    "agentmesh.auth.v1.UpdateUserRequest": {"user"},
    "agentmesh.auth.v1.DeleteUserRequest": {"user_id"},
    "agentmesh.auth.v1.DisableUserRequest": {"user_id"},
    "agentmesh.auth.v1.EnableUserRequest": {"user_id"},
    # users.py create(): normalize_email "is required"; an unset role or kind is refused.
    "agentmesh.auth.v1.CreateUserRequest": {"email", "role", "kind"},
    # delete_current(): an empty password is refused as wrong (PERMISSION_DENIED), as in
    # ChangePassword; a service account cannot call it at all.
    "agentmesh.auth.v1.DeleteCurrentUserRequest": {"current_password"},
    # services/auth/invitations.py accept(): "is required" on each (an empty password
    # fails the policy too).
    "agentmesh.auth.v1.AcceptInvitationRequest": {"invitation_token", "password"},
    # services/auth/api_keys.py clean_key_name(): "is required"; revoke(): require_uuid.
    "agentmesh.auth.v1.CreateApiKeyRequest": {"name"},
    "agentmesh.auth.v1.RevokeApiKeyRequest": {"api_key_id"},
    # services/teams/groups.py clean_name(): "is required"; _id(): "must be a UUID" on
    # `group_id` and `user_id` (`group.group_id` for UpdateGroup); set_role(): an unset role.
    "agentmesh.teams.v1.CreateGroupRequest": {"name"},
    "agentmesh.teams.v1.GetGroupRequest": {"group_id"},
    "agentmesh.teams.v1.UpdateGroupRequest": {"group"},
    "agentmesh.teams.v1.DeleteGroupRequest": {"group_id"},
    "agentmesh.teams.v1.ListGroupMembersRequest": {"group_id"},
    "agentmesh.teams.v1.AddGroupMemberRequest": {"group_id", "user_id"},
    "agentmesh.teams.v1.RemoveGroupMemberRequest": {"group_id", "user_id"},
    "agentmesh.teams.v1.SetGroupMemberRoleRequest": {"group_id", "user_id", "role"},
    # services/knowledge/collections.py clean_name(): "is required"; collection_id(): "must
    # be a UUID" on every id; parse_grantee(): "name a grantee"; grant(): an unset access.
    "agentmesh.knowledge.v1.CreateCollectionRequest": {"name"},
    "agentmesh.knowledge.v1.GetCollectionRequest": {"collection_id"},
    "agentmesh.knowledge.v1.DeleteCollectionRequest": {"collection_id"},
    "agentmesh.knowledge.v1.AddCollectionDocumentRequest": {"collection_id", "document_id"},
    "agentmesh.knowledge.v1.RemoveCollectionDocumentRequest": {"collection_id", "document_id"},
    "agentmesh.knowledge.v1.MoveDocumentRequest": {
        "document_id",
        "from_collection_id",
        "to_collection_id",
    },
    "agentmesh.knowledge.v1.GrantCollectionAccessRequest": {"collection_id", "grant"},
    "agentmesh.knowledge.v1.RevokeCollectionAccessRequest": {"collection_id", "grant"},
    "agentmesh.knowledge.v1.ListCollectionGrantsRequest": {"collection_id"},
    # services/knowledge/service.py _validate_upload(): filename "is required";
    # parsing.inspect_upload(): "the document is empty".
    "agentmesh.knowledge.v1.UploadDocumentRequest": {"filename", "content"},
    # _document_id(): "must be a UUID".
    "agentmesh.knowledge.v1.GetDocumentRequest": {"document_id"},
    "agentmesh.knowledge.v1.DeleteDocumentRequest": {"document_id"},
    # _validate_search(): query "is required".
    "agentmesh.knowledge.v1.SearchKnowledgeBaseRequest": {"query"},
    # services/feedback/service.py _validate(): message_id must be a UUID, rating "is
    # required" (RATING_UNSPECIFIED maps to no rating).
    "agentmesh.feedback.v1.SubmitFeedbackRequest": {"message_id", "rating"},
    # server/servicers/indexing.py (internal): require_uuid on the ids, generation "is
    # required".
    "agentmesh.indexing.v1.UpsertPassagesRequest": {"document_id", "generation", "owner_id"},
    "agentmesh.indexing.v1.DeleteGenerationRequest": {"document_id", "generation"},
    "agentmesh.indexing.v1.DeleteDocumentPassagesRequest": {"document_id"},
    "agentmesh.indexing.v1.DeleteOwnerPassagesRequest": {"owner_id"},
    # server/servicers/indexing.py _texts_to_embed(): 1 to 128 texts, kind "is required".
    "agentmesh.indexing.v1.EmbedTextsRequest": {"texts", "kind"},
    # (QueryRequest.query is required except with regenerate_message_id: OPTIONAL, and
    # services/agent/service.py _place() says when.)
    # services/agent/run_log.py run_id_of(): "is required".
    "agentmesh.agent.v1.AttachRunRequest": {"run_id"},
    "agentmesh.agent.v1.CancelRunRequest": {"run_id"},
    # services/agent/conversations.py conversation_id_of(): "must be a UUID".
    "agentmesh.agent.v1.GetConversationRequest": {"conversation_id"},
    "agentmesh.agent.v1.DeleteConversationRequest": {"conversation_id"},
    # services/agent/service.py switch_branch(): conversation_id_of() and require_uuid().
    "agentmesh.agent.v1.SwitchBranchRequest": {"conversation_id", "message_id"},
    # services/analytics/stats.py _user(): "must be a UUID".
    "agentmesh.analytics.v1.GetUserStatsRequest": {"user_id"},
}
REQUIRED = field_behavior_pb2.REQUIRED
OUTPUT_ONLY = field_behavior_pb2.OUTPUT_ONLY
IDENTIFIER = field_behavior_pb2.IDENTIFIER
IMMUTABLE = field_behavior_pb2.IMMUTABLE
TIMESTAMP = "google.protobuf.Timestamp"


def _contract_messages() -> list[descriptor.Descriptor]:
    """Every message of the generated *_pb2 modules under gen/agentmesh, nested ones too."""
    found: list[descriptor.Descriptor] = []

    def add(message: descriptor.Descriptor) -> None:
        found.append(message)
        for nested in message.nested_types:
            add(nested)

    gen = ROOT / "gen"
    for path in sorted((gen / "agentmesh").rglob("*_pb2.py")):
        module = importlib.import_module(".".join(path.relative_to(gen).with_suffix("").parts))
        for message in module.DESCRIPTOR.message_types_by_name.values():
            add(message)
    assert found, "no generated messages under gen/agentmesh"
    return found


def _behaviors(field: descriptor.FieldDescriptor) -> set[int]:
    return set(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])  # type: ignore[index]


def _is_request(message: descriptor.Descriptor) -> bool:
    return message.name.endswith("Request")


def test_required_marks_exactly_the_fields_the_server_requires() -> None:
    marked = {
        message.full_name: {f.name for f in message.fields if REQUIRED in _behaviors(f)}
        for message in _contract_messages()
    }
    assert {name: fields for name, fields in marked.items() if fields} == REQUIRED_FIELDS


def _is_required_violations() -> Iterator[tuple[Path, str]]:
    """The field names of the literal `violations.add("f", "is required...")` and
    `InvalidArgument.of("f", "is required...")` calls in server/ and services/
    (conditional ones, "is required unless ...", excepted)."""
    for path in sorted([*(ROOT / "server").rglob("*.py"), *(ROOT / "services").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"add", "of"}
                and len(node.args) == 2
                and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)
            ):
                continue
            field, text = (a.value for a in node.args)  # type: ignore[attr-defined]
            if text.startswith("is required") and " unless " not in text:
                yield path.relative_to(ROOT), field


def test_every_is_required_violation_names_a_required_field() -> None:
    required = {
        field.name
        for message in _contract_messages()
        if _is_request(message)
        for field in message.fields
        if REQUIRED in _behaviors(field)
    }
    violations = list(_is_required_violations())
    assert violations, "found no `is required` violation in server/ or services/"
    unmarked = {(str(path), field) for path, field in violations if field not in required}
    assert not unmarked, f"refused as missing but not REQUIRED in any request: {unmarked}"


def test_field_behaviors_fit_their_messages() -> None:
    for message in _contract_messages():
        for field in message.fields:
            marks = _behaviors(field)
            where = f"{message.full_name}.{field.name}"
            if _is_request(message):
                # A request field is input: the server reads it, so it is never output only.
                assert not marks & {OUTPUT_ONLY, IDENTIFIER, IMMUTABLE}, where
            else:
                assert REQUIRED not in marks, f"{where}: REQUIRED outside a request"
            assert not {REQUIRED, field_behavior_pb2.OPTIONAL} <= marks, where


def _resources() -> list[descriptor.Descriptor]:
    """The stored resources: messages with a `created_at` timestamp (User, Document, ...)."""
    return [
        message
        for message in _contract_messages()
        if (created := message.fields_by_name.get("created_at")) is not None
        and created.message_type is not None
        and created.message_type.full_name == TIMESTAMP
    ]


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def test_resource_ids_and_timestamps_are_output_only() -> None:
    resources = _resources()
    assert resources, "no message with a created_at timestamp"
    in_requests = {
        field.message_type.full_name
        for message in _contract_messages()
        if _is_request(message)
        for field in message.fields
        if field.message_type is not None
    }
    for resource in resources:
        own_id = f"{_snake(resource.name)}_id"
        assert own_id in resource.fields_by_name, f"{resource.full_name} has no {own_id}"
        for field in resource.fields:
            marks, where = _behaviors(field), f"{resource.full_name}.{field.name}"
            if field.name == own_id:
                # An id the client sends back to name the resource (UpdateUserRequest.user)
                # is an IDENTIFIER, not output only: the server reads it there.
                expected = IDENTIFIER if resource.full_name in in_requests else OUTPUT_ONLY
                assert marks == {expected}, where
            elif field.message_type is not None and field.message_type.full_name == TIMESTAMP:
                assert marks == {OUTPUT_ONLY}, where
            elif field.name.endswith("_id"):
                # Owner and parent ids: set by the server, or fixed when it is created.
                assert marks & {OUTPUT_ONLY, IMMUTABLE}, where
