// The agentmesh chat page: plain DOM, no framework, only the public REST API of this origin
// (the same routes as curl; JSON with the protos' field names, enums as strings).
//
// Security: whatever a model, a document or a user wrote goes into the page as text
// (textContent, text nodes), never parsed as HTML, so an answer or a passage holding
// `<script>` or `<img onerror=...>` shows those characters and runs nothing. Tokens: the
// access token lives in memory only; the refresh token in sessionStorage, so a reload keeps
// the session and closing the tab ends it (never localStorage, never a URL).

const REFRESH_KEY = "agentmesh.refresh_token";
// The streamed run in progress, so a reload can re-attach to it: its run id, the last event
// seen (seq), and what was shown of it so far.
const RUN_KEY = "agentmesh.pending_run";
const USER = "MESSAGE_ROLE_USER";
const POLL_MS = 1000;

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** An element with attributes, listeners (`onclick`), text and children: never HTML. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === false || value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

/** "TOOL_OUTCOME_OK" -> "ok": an enum value as a word. */
function word(value, prefix) {
  return String(value || "").replace(prefix, "").toLowerCase().replaceAll("_", " ");
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
  }
}

// ---- session and calls ----

const session = { accessToken: "", refreshing: null };

function keepTokens(body) {
  session.accessToken = body.access_token;
  sessionStorage.setItem(REFRESH_KEY, body.refresh_token);
}

/** Exchange the refresh token for new tokens (once, however many calls got a 401). */
function refreshTokens() {
  const token = sessionStorage.getItem(REFRESH_KEY);
  if (!token) return Promise.resolve(false);
  if (!session.refreshing) {
    session.refreshing = (async () => {
      const response = await fetch("/v1/auth/refresh", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ refresh_token: token }),
      });
      if (!response.ok) return false;
      keepTokens(await response.json());
      return true;
    })().finally(() => {
      session.refreshing = null;
    });
  }
  return session.refreshing;
}

/** A REST call with the access token; on 401 refresh once and retry, then sign out. */
async function call(method, path, body) {
  const send = () => {
    const headers = {};
    if (session.accessToken) headers.authorization = `Bearer ${session.accessToken}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const payload = body === undefined ? undefined : JSON.stringify(body);
    return fetch(path, { method, headers, body: payload });
  };
  let response = await send();
  if (response.status === 401 && (await refreshTokens())) response = await send();
  if (response.status === 401) {
    signedOut("Your session ended: please sign in again.");
    throw new ApiError(401, { message: "signed out" });
  }
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  return response;
}

async function json(method, path, body) {
  return (await call(method, path, body)).json();
}

/** The events of a server-sent-event response (`data: {json}` blocks), as objects. */
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

function showError(where, error) {
  if (error instanceof ApiError && error.status === 401) return; // signedOut said it
  $(where).textContent = error.message || String(error);
}

// ---- signing in and out ----

function show(signedIn) {
  $("auth-view").hidden = signedIn;
  $("chat-view").hidden = !signedIn;
  $("sign-out").hidden = !signedIn;
}

function signedOut(reason = "") {
  session.accessToken = "";
  sessionStorage.removeItem(REFRESH_KEY);
  sessionStorage.removeItem(RUN_KEY);
  $("who").textContent = "";
  $("auth-error").textContent = reason;
  $("documents").replaceChildren();
  show(false);
}

async function signIn(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const credentials = { email: form.get("email"), password: form.get("password") };
  $("auth-error").textContent = "";
  try {
    if (event.submitter && event.submitter.value === "register") {
      await json("POST", "/v1/auth/register", {
        ...credentials,
        full_name: form.get("full_name") || "",
      });
    }
    keepTokens(await json("POST", "/v1/auth/login", credentials));
    event.target.reset();
    await enter();
  } catch (error) {
    showError("auth-error", error);
  }
}

async function signOut() {
  const token = sessionStorage.getItem(REFRESH_KEY);
  try {
    if (token) await call("POST", "/v1/auth/logout", { refresh_token: token });
  } finally {
    signedOut();
  }
}

/** The signed-in page: who, the conversations, the documents, a run to pick up again. */
async function enter() {
  const me = await json("GET", "/v1/users/me");
  $("who").textContent = me.user ? me.user.email : "";
  show(true);
  newChat();
  await Promise.all([listConversations(), listDocuments()]);
  await resume();
}

// ---- conversations ----

const view = { conversationId: "", messages: [], busy: false };

async function listConversations() {
  const words = $("search").value.trim();
  const query = words ? `?query=${encodeURIComponent(words)}` : "";
  try {
    const { conversations } = await json("GET", `/v1/agent/conversations${query}`);
    $("conversations").replaceChildren(
      ...conversations.map((conversation) =>
        el(
          "li",
          {},
          el("button", {
            type: "button",
            class: "conversation-link",
            "data-conversation-id": conversation.conversation_id,
            "aria-current": conversation.conversation_id === view.conversationId && "true",
            text: conversation.title || "(untitled)",
            onclick: () => openConversation(conversation.conversation_id),
          }),
        ),
      ),
    );
  } catch (error) {
    showError("chat-error", error);
  }
}

function newChat() {
  view.conversationId = "";
  render([]);
  $("question").focus();
}

async function openConversation(conversationId) {
  if (view.busy) return;
  $("chat-error").textContent = "";
  try {
    const { messages } = await json("GET", `/v1/agent/conversations/${conversationId}`);
    view.conversationId = conversationId;
    render(messages);
    await listConversations();
  } catch (error) {
    showError("chat-error", error);
  }
}

async function switchBranch(messageId) {
  if (view.busy) return;
  try {
    const path = `/v1/agent/conversations/${view.conversationId}:switchBranch`;
    const { messages } = await json("POST", path, { message_id: messageId });
    render(messages);
  } catch (error) {
    showError("chat-error", error);
  }
}

/** Show `messages` (the active branch), then `extra` items (a run in progress). */
function render(messages, extra = []) {
  view.messages = messages;
  $("messages").replaceChildren(...messages.map(messageItem), ...extra);
  $("messages").lastElementChild?.scrollIntoView({ block: "end" });
}

function messageItem(message) {
  return message.role === USER ? questionItem(message) : answerCard(message).item;
}

/** "‹ 2/3 ›" between the branches at a message (its siblings), when there are several. */
function branchArrows(message) {
  const siblings = message.sibling_message_ids || [];
  if (siblings.length < 2) return null;
  const at = siblings.indexOf(message.message_id);
  return el(
    "span",
    { class: "branches" },
    el("button", {
      type: "button",
      class: "branch-previous",
      "aria-label": "Previous branch",
      disabled: at <= 0,
      text: "‹",
      onclick: () => switchBranch(siblings[at - 1]),
    }),
    el("span", { class: "branch-position", text: `${at + 1}/${siblings.length}` }),
    el("button", {
      type: "button",
      class: "branch-next",
      "aria-label": "Next branch",
      disabled: at >= siblings.length - 1,
      text: "›",
      onclick: () => switchBranch(siblings[at + 1]),
    }),
  );
}

function questionItem(message) {
  const item = el("li", { class: "message user", "data-message-id": message.message_id || "" });
  const text = el("div", { class: "text", text: message.content });
  const actions = el("div", { class: "actions" }, branchArrows(message));
  if (message.message_id) {
    actions.append(
      el("button", {
        type: "button",
        class: "edit",
        text: "Edit",
        onclick: () => editQuestion(item, message),
      }),
    );
  }
  item.append(text, actions);
  return item;
}

function editQuestion(item, message) {
  if (view.busy) return;
  const box = el("textarea", { class: "edit-box", rows: 3, "aria-label": "Edited question" });
  box.value = message.content;
  const form = el(
    "form",
    { class: "edit-form" },
    box,
    el(
      "div",
      { class: "row" },
      el("button", { type: "submit", class: "save-edit", text: "Save and ask" }),
      el("button", {
        type: "button",
        class: "secondary",
        text: "Cancel",
        onclick: () => render(view.messages),
      }),
    ),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = box.value.trim();
    if (!query) return;
    const keep = view.messages.findIndex((m) => m.message_id === message.message_id);
    run(
      { query, conversation_id: view.conversationId, edit_message_id: message.message_id },
      { keep, question: query },
    );
  });
  item.replaceChildren(form);
  box.focus();
}

function regenerate(message) {
  if (view.busy) return;
  const keep = view.messages.findIndex((m) => m.message_id === message.message_id);
  run(
    { conversation_id: view.conversationId, regenerate_message_id: message.message_id },
    { keep, question: null },
  );
}

async function giveFeedback(message, rating, buttons) {
  try {
    await json("POST", "/v1/feedback", { message_id: message.message_id, rating });
    for (const [value, button] of buttons) button.setAttribute("aria-pressed", value === rating);
  } catch (error) {
    showError("chat-error", error);
  }
}

// ---- answers and citations ----

function openCitation(citation) {
  $("citation-title").textContent = `[${citation.index}] ${citation.title || "Source"}`;
  const where = [];
  if (citation.page) where.push(`page ${citation.page}`);
  if (citation.url) where.push(citation.url);
  else if (citation.document_id) where.push(`document ${citation.document_id}`);
  $("citation-meta").textContent = where.join(" · ");
  $("citation-text").textContent = citation.snippet || "(no passage text)";
  $("citation-dialog").showModal();
}

function citationButton(citation, label) {
  return el("button", {
    type: "button",
    class: "cite",
    "data-index": citation.index,
    title: citation.title || "",
    text: label,
    onclick: () => openCitation(citation),
  });
}

/** The answer text with each [n] whose source is known as a button that opens it. */
function citedText(node, content, citations) {
  const parts = [];
  let last = 0;
  for (const match of content.matchAll(/\[(\d+)\]/g)) {
    const citation = citations.get(Number(match[1]));
    if (!citation) continue;
    parts.push(content.slice(last, match.index), citationButton(citation, match[0]));
    last = match.index + match[0].length;
  }
  parts.push(content.slice(last));
  node.replaceChildren(...parts);
}

function toolLine(name, state) {
  return el("li", { class: "tool" }, el("span", { class: "tool-name", text: name }), ` ${state}`);
}

/** An answer: its text with citations, tool progress, and (once stored) its actions. */
function answerCard(message = null) {
  const progress = el("ul", { class: "progress", "aria-label": "Tool progress" });
  const text = el("div", { class: "text" });
  const sources = el("div", { class: "sources" });
  const actions = el("div", { class: "actions" });
  const item = el("li", { class: "message assistant" }, progress, text, sources, actions);
  const citations = new Map();
  const tools = new Map();
  let content = "";
  const card = {
    item,
    append(piece) {
      content += piece;
      citedText(text, content, citations);
    },
    cite(citation) {
      if (citations.has(citation.index)) return;
      citations.set(citation.index, citation);
      sources.append(citationButton(citation, `[${citation.index}] ${citation.title || ""}`));
      citedText(text, content, citations);
    },
    toolCall(call) {
      const line = toolLine(call.tool_name, "running…");
      line.classList.add("running");
      tools.set(call.tool_call_id, line);
      progress.append(line);
    },
    toolResult(result) {
      const outcome = word(result.outcome, "TOOL_OUTCOME_");
      const detail = result.error_message || result.summary || "";
      const line = toolLine(result.tool_name, `${outcome}${detail ? `: ${detail}` : ""}`);
      line.classList.add(`outcome-${outcome.replaceAll(" ", "-")}`);
      const old = tools.get(result.tool_call_id);
      if (old) old.replaceWith(line);
      else progress.append(line);
      tools.set(result.tool_call_id, line);
    },
  };
  if (message) {
    item.dataset.messageId = message.message_id;
    for (const call of message.tool_calls || []) {
      card.toolResult({ ...call, tool_name: call.name, summary: "" });
    }
    for (const citation of message.citations || []) card.cite(citation);
    card.append(message.content);
    actions.append(...answerActions(message));
  } else {
    item.classList.add("streaming");
  }
  return card;
}

function answerActions(message) {
  const buttons = new Map();
  const rating = message.feedback ? message.feedback.rating : "";
  for (const [value, label, name] of [
    // Words rather than emoji: they show on any system, fonts or not.
    ["RATING_THUMBS_UP", "▲ Good", "Good answer"],
    ["RATING_THUMBS_DOWN", "▼ Bad", "Bad answer"],
  ]) {
    const button = el("button", {
      type: "button",
      class: `feedback ${value === "RATING_THUMBS_UP" ? "thumbs-up" : "thumbs-down"}`,
      "aria-label": name,
      "aria-pressed": String(rating === value),
      text: label,
      onclick: () => giveFeedback(message, value, buttons),
    });
    buttons.set(value, button);
  }
  const regenerateButton = el("button", {
    type: "button",
    class: "regenerate",
    text: "Regenerate",
    onclick: () => regenerate(message),
  });
  return [branchArrows(message), ...buttons.values(), regenerateButton].filter(Boolean);
}

// ---- runs: streaming, and picking one up again after a reload ----

function busy(value) {
  view.busy = value;
  $("ask").disabled = value;
  $("messages").classList.toggle("busy", value);
}

/** Start a run: show the messages before it (`keep` of them), the question, its answer. */
async function run(request, { keep, question }) {
  const shown = view.messages.slice(0, keep < 0 ? view.messages.length : keep);
  const pending = {
    run_id: "",
    seq: 0,
    conversation_id: view.conversationId,
    keep: shown.length,
    question,
    text: "",
    citations: [],
  };
  $("chat-error").textContent = "";
  busy(true);
  const card = answerCard();
  const asked = question === null ? null : questionItem({ role: USER, content: question });
  render(shown, [asked, card.item].filter(Boolean));
  view.messages = shown;
  try {
    const response = await call("POST", "/v1/agent/query:stream", request);
    await follow(response, card, pending);
  } catch (error) {
    showError("chat-error", error);
    await settle();
  } finally {
    busy(false);
  }
}

/** Show a run's events as they come, remembering each one for a reload, until it ends. */
async function follow(response, card, pending) {
  let ended = false;
  for await (const event of events(response)) {
    pending.run_id = event.run_id;
    pending.seq = event.seq;
    if (event.run_started) {
      pending.conversation_id = event.run_started.conversation_id;
      view.conversationId = pending.conversation_id;
    } else if (event.token) {
      pending.text += event.token.text;
      card.append(event.token.text);
    } else if (event.citation) {
      pending.citations.push(event.citation);
      card.cite(event.citation);
    } else if (event.tool_call) {
      card.toolCall(event.tool_call);
    } else if (event.tool_result) {
      card.toolResult(event.tool_result);
    } else if (event.error) {
      sessionStorage.removeItem(RUN_KEY);
      throw new ApiError(0, event.error);
    } else if (event.completed) {
      ended = true;
    }
    sessionStorage.setItem(RUN_KEY, JSON.stringify(pending));
  }
  if (!ended && pending.run_id && !pending.reattached) {
    // The stream broke before the run ended: the run goes on server-side; follow it.
    pending.reattached = true;
    return follow(await attach(pending), card, pending);
  }
  await settle();
}

function attach(pending) {
  return call("POST", `/v1/agent/runs/${pending.run_id}:attach`, { after_seq: pending.seq });
}

/** After a run: forget it, and show the conversation as stored. */
async function settle() {
  sessionStorage.removeItem(RUN_KEY);
  if (view.conversationId) {
    try {
      const { messages } = await json("GET", `/v1/agent/conversations/${view.conversationId}`);
      render(messages);
    } catch (error) {
      showError("chat-error", error);
    }
  }
  await listConversations();
}

/** After a reload: show the run that was streaming as far as it got, and follow the rest. */
async function resume() {
  const pending = JSON.parse(sessionStorage.getItem(RUN_KEY) || "null");
  if (!pending || !pending.run_id) return;
  busy(true);
  try {
    view.conversationId = pending.conversation_id;
    let shown = [];
    try {
      const path = `/v1/agent/conversations/${pending.conversation_id}`;
      shown = (await json("GET", path)).messages.slice(0, pending.keep);
    } catch (error) {
      if (error.status !== 404) throw error; // a new conversation is stored when its run ends
    }
    const card = answerCard();
    for (const citation of pending.citations) card.cite(citation);
    card.append(pending.text);
    const asked =
      pending.question === null ? null : questionItem({ role: USER, content: pending.question });
    render(shown, [asked, card.item].filter(Boolean));
    view.messages = shown;
    pending.reattached = true; // this is the re-attach: a stream that ends early is the end
    await follow(await attach(pending), card, pending);
  } catch (error) {
    showError("chat-error", error);
    await settle();
  } finally {
    busy(false);
  }
}

function ask(event) {
  event.preventDefault();
  const query = $("question").value.trim();
  if (!query || view.busy) return;
  $("question").value = "";
  run({ query, conversation_id: view.conversationId }, { keep: -1, question: query });
}

// ---- documents ----

function documentRow() {
  const title = el("span", { class: "document-title" });
  const status = el("span", { class: "document-status" });
  const item = el("li", { class: "document" }, title, " ", status);
  return {
    item,
    update(document) {
      item.dataset.documentId = document.document_id || "";
      item.dataset.status = word(document.status, "DOCUMENT_STATUS_");
      title.textContent = document.title || document.filename;
      const stage = word(document.stage, "INGESTION_STAGE_");
      status.textContent =
        document.status === "DOCUMENT_STATUS_PROCESSING" && stage
          ? `processing (${stage})`
          : item.dataset.status;
      if (document.failure_reason) status.title = document.failure_reason;
    },
  };
}

/** Poll a document until it is READY or FAILED, showing each step. */
async function watchDocument(row, document) {
  row.update(document);
  while (document.status === "DOCUMENT_STATUS_PROCESSING") {
    await sleep(POLL_MS);
    ({ document } = await json("GET", `/v1/kb/documents/${document.document_id}`));
    row.update(document);
  }
}

async function listDocuments() {
  try {
    const { documents } = await json("GET", "/v1/kb/documents");
    // Added to what is shown, never replacing it: an upload started while the list loaded
    // already has its row (signing out empties the list).
    const shown = new Set([...$("documents").children].map((item) => item.dataset.documentId));
    for (const document of documents) {
      if (shown.has(document.document_id)) continue;
      const row = documentRow();
      $("documents").append(row.item);
      watchDocument(row, document).catch((error) => showError("chat-error", error));
    }
  } catch (error) {
    showError("chat-error", error);
  }
}

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let at = 0; at < bytes.length; at += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(at, at + 0x8000));
  }
  return btoa(binary);
}

async function upload(file) {
  const row = documentRow();
  row.update({ filename: file.name, status: "uploading" });
  $("documents").prepend(row.item);
  try {
    const content = base64(await file.arrayBuffer());
    const { document } = await json("POST", "/v1/kb/documents", { filename: file.name, content });
    // The list, if it loaded meanwhile, may show the same document: one row is enough.
    for (const item of $("documents").querySelectorAll("li.document")) {
      if (item !== row.item && item.dataset.documentId === document.document_id) item.remove();
    }
    await watchDocument(row, document);
  } catch (error) {
    row.update({ filename: file.name, status: "DOCUMENT_STATUS_FAILED" });
    showError("chat-error", error);
  }
}

// ---- start ----

function debounce(action, ms) {
  let timer = 0;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(action, ms);
  };
}

async function start() {
  $("auth-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("new-chat").addEventListener("click", () => !view.busy && newChat());
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    listConversations();
  });
  $("search").addEventListener("input", debounce(listConversations, 300));
  $("upload").addEventListener("change", (event) => {
    for (const file of event.target.files) upload(file);
    event.target.value = "";
  });
  // A reload keeps the session: the refresh token in sessionStorage gives a new access token.
  if (await refreshTokens().catch(() => false)) {
    try {
      await enter();
      return;
    } catch (error) {
      showError("auth-error", error);
    }
  }
  signedOut($("auth-error").textContent);
}

start();
