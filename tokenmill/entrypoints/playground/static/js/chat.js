// The chat page: a multi-turn conversation streamed from /v1/chat/completions. Answers render as Markdown
// while they stream; reasoning_content sits collapsed above the answer; tool calls (parallel ones each in their
// own card) are merged from their streamed deltas. Stop aborts the fetch, and the server aborts the request
// when its client goes away. Each answer shows its tokens, time to first token and decode speed.

import {api, engine, sseEvents} from "./api.js";
import {field, h} from "./dom.js";
import {highlight} from "./highlight.js";
import {renderMarkdown} from "./markdown.js";
import {samplingForm} from "./params.js";
import {structuredForm, toolsForm} from "./structured.js";

export function mountChat(root) {
  const history = [];  // the conversation sent to the server, without the system prompt
  let controller = null;

  const system = h("textarea", {id: "chat-system", rows: 3, placeholder: "You are a helpful assistant."});
  const params = samplingForm("chat");
  const structured = structuredForm();
  const tools = toolsForm();
  const messages = h("div", {class: "messages", id: "chat-messages"});
  const input = h("textarea", {id: "chat-input", rows: 3, placeholder: "Message (Enter sends, Shift+Enter: new line)"});
  const send = h("button", {id: "chat-send", class: "primary", onclick: () => submit()}, "Send");
  const stop = h("button", {id: "chat-stop", class: "danger", disabled: true, onclick: () => controller?.abort()},
    "Stop");
  const regenerate = h("button", {id: "chat-regenerate", disabled: true, onclick: () => regenerateLast()},
    "Regenerate");
  const clear = h("button", {id: "chat-clear", onclick: () => {
    history.length = 0;
    messages.replaceChildren();
    regenerate.disabled = true;
  }}, "Clear");
  const error = h("div", {class: "error", id: "chat-error"});
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      submit();
    }
  });

  root.append(h("div", {class: "layout"},
    h("div", {}, h("div", {class: "panel"}, field("System prompt", system)), h("p"), messages, error,
      input, h("div", {class: "row", style: "margin-top: 6px"}, h("span"), send, stop, regenerate, clear)),
    h("div", {}, params.element, h("p"), structured.element, h("p"), tools.element)));

  function submit() {
    const text = input.value.trim();
    if (!text || controller) return;
    history.push({role: "user", content: text});
    messages.append(h("div", {class: "msg user"}, text));
    input.value = "";
    generate();
  }

  function regenerateLast() {
    if (controller || !history.length || history[history.length - 1].role !== "assistant") return;
    history.pop();
    messages.lastElementChild.remove();
    generate();
  }

  function request() {
    const body = {model: engine.model, stream: true, stream_options: {include_usage: true},
      ...params.values(), ...structured.values(), ...tools.values()};
    const prompt = system.value.trim();
    body.messages = [...(prompt ? [{role: "system", content: prompt}] : []), ...history];
    return body;
  }

  async function generate() {
    error.textContent = "";
    let body;
    try {
      body = request();
    } catch (e) {
      error.textContent = e.message;
      return;
    }
    const view = answerView();
    messages.append(view.element);
    controller = new AbortController();
    send.disabled = regenerate.disabled = true;
    stop.disabled = false;
    const answer = {content: "", reasoning: "", toolCalls: [], usage: null, finish: null};
    const started = performance.now();
    let firstAt = null;
    let ended = null;
    try {
      const response = await api("/v1/chat/completions", {json: body, signal: controller.signal});
      for await (const chunk of sseEvents(response)) {
        if (chunk.usage) answer.usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (!choice) continue;
        const delta = choice.delta || {};
        if (delta.content || delta.reasoning_content || delta.tool_calls) firstAt ??= performance.now();
        answer.content += delta.content || "";
        answer.reasoning += delta.reasoning_content || "";
        for (const call of delta.tool_calls || []) mergeToolCall(answer.toolCalls, call);
        answer.finish = choice.finish_reason || answer.finish;
        view.render(answer);
      }
    } catch (e) {
      if (e.name === "AbortError") answer.finish = "stopped";
      else error.textContent = e.message;
    } finally {
      ended = performance.now();
      controller = null;
      send.disabled = false;
      stop.disabled = true;
    }
    view.render(answer, stats(answer, started, firstAt, ended));
    const message = {role: "assistant", content: answer.content};
    if (answer.toolCalls.length) message.tool_calls = answer.toolCalls;
    history.push(message);
    regenerate.disabled = false;
  }
  return {history};
}

function mergeToolCall(calls, delta) {
  const index = delta.index ?? calls.length;
  calls[index] ??= {id: delta.id || "", type: "function", function: {name: "", arguments: ""}};
  const call = calls[index];
  if (delta.id) call.id = delta.id;
  call.function.name += delta.function?.name || "";
  call.function.arguments += delta.function?.arguments || "";
}

function stats(answer, started, firstAt, ended) {
  const parts = [];
  const tokens = answer.usage?.completion_tokens;
  if (tokens !== undefined) parts.push(`${tokens} tokens`);
  if (firstAt !== null) {
    parts.push(`TTFT ${Math.round(firstAt - started)} ms`);
    if (tokens > 1 && ended > firstAt) parts.push(`${((tokens - 1) / ((ended - firstAt) / 1000)).toFixed(1)} tok/s`);
  }
  if (answer.finish) parts.push(answer.finish === "stopped" ? "stopped" : `finish: ${answer.finish}`);
  return parts.join(" · ");
}

// JSON text indented, or null when the text is not (yet) JSON.
function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return null;
  }
}

// A whole answer that is JSON (a structured output) shows as highlighted JSON; anything else as Markdown.
function renderContent(text) {
  const json = /^\s*[[{]/.test(text) ? prettyJson(text) : null;
  return json === null ? renderMarkdown(text) : `<pre><code class="language-json">${highlight(json, "json")}</code></pre>`;
}

function answerView() {
  const reasoning = h("div", {class: "reasoning"});
  const thinking = h("details", {hidden: true}, h("summary", {}, "Reasoning"), reasoning);
  const content = h("div", {class: "content"});
  const calls = h("div", {class: "tool-calls"});
  const meta = h("div", {class: "meta"}, "…");
  const element = h("div", {class: "msg assistant"}, thinking, content, calls, meta);
  return {
    element,
    render(answer, footer) {
      thinking.hidden = !answer.reasoning;
      reasoning.textContent = answer.reasoning;
      content.innerHTML = renderContent(answer.content);
      calls.replaceChildren(...answer.toolCalls.map(({function: call}) => h("div", {class: "tool-call"},
        h("strong", {}, `${call.name}()`), h("pre", {}, prettyJson(call.arguments) ?? call.arguments))));
      if (footer !== undefined) meta.textContent = footer;
      element.parentElement?.scrollTo({top: element.parentElement.scrollHeight});
    },
  };
}
