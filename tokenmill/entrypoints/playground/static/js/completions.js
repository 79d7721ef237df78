// The completions page: a raw prompt streamed from /v1/completions with per-token logprobs. Each generated
// token is its own span, tinted by its probability; hovering it lists the top alternatives the server returned.

import {api, engine, sseEvents} from "./api.js";
import {field, h} from "./dom.js";
import {samplingForm} from "./params.js";

function percent(logprob) {
  return `${(Math.exp(logprob) * 100).toFixed(1)}%`;
}

export function mountCompletions(root) {
  const prompt = h("textarea", {id: "completion-prompt", rows: 5}, "The capital of France is");
  const numLogprobs = h("input", {id: "completion-logprobs", type: "number", min: 0, max: 20, value: 5});
  const params = samplingForm("completion");
  params.inputs.max_tokens.value = "32";
  const output = h("div", {class: "completion-out panel", id: "completion-output"});
  const meta = h("div", {class: "muted", id: "completion-meta"});
  const error = h("div", {class: "error"});
  const tip = h("div", {id: "logprob-tip", hidden: true});
  let controller = null;
  const run = h("button", {class: "primary", id: "completion-run", onclick: () => complete()}, "Complete");
  const stop = h("button", {class: "danger", disabled: true, onclick: () => controller?.abort()}, "Stop");

  root.append(tip, h("div", {class: "layout"},
    h("div", {}, h("div", {class: "panel"}, field("Prompt", prompt),
      h("div", {class: "row", style: "margin-top: 6px"}, h("span"), run, stop)), h("p"), output, meta, error),
    h("div", {}, h("div", {class: "panel"}, field("Logprobs (top alternatives per token, 0-20)", numLogprobs)),
      h("p"), params.element)));

  output.addEventListener("mouseover", (event) => {
    const token = event.target.closest(".ctok");
    if (!token) return;
    const alternatives = JSON.parse(token.dataset.top || "{}");
    const chosen = token.dataset.token;
    tip.replaceChildren(h("table", {}, Object.entries(alternatives).sort((a, b) => b[1] - a[1]).map(([text, lp]) =>
      h("tr", {class: text === chosen ? "chosen" : ""}, h("td", {}, JSON.stringify(text)), h("td", {}, percent(lp)),
        h("td", {}, lp.toFixed(3))))));
    const box = token.getBoundingClientRect();
    tip.style.left = `${box.left}px`;
    tip.style.top = `${box.bottom + 4}px`;
    tip.hidden = false;
  });
  output.addEventListener("mouseout", (event) => {
    if (event.target.closest(".ctok")) tip.hidden = true;
  });

  function appendTokens(logprobs, text) {
    if (!logprobs) {
      output.append(text);
      return;
    }
    logprobs.tokens.forEach((token, i) => {
      const logprob = logprobs.token_logprobs[i];
      const probability = logprob === null ? 1 : Math.exp(logprob);
      output.append(h("span", {class: "ctok", "data-token": token, "data-top": JSON.stringify(
        logprobs.top_logprobs[i] || {}), style: `background: hsla(${Math.round(probability * 120)}, 70%, 60%, .35)`,
      title: logprob === null ? "" : `${percent(logprob)} (logprob ${logprob.toFixed(3)})`}, token));
    });
  }

  async function complete() {
    error.textContent = meta.textContent = "";
    let body;
    try {
      const count = numLogprobs.value === "" ? null : Number(numLogprobs.value);
      if (count !== null && !(Number.isInteger(count) && count >= 0 && count <= 20)) {
        throw new Error(`Logprobs must be a whole number from 0 to 20, got "${numLogprobs.value}"`);
      }
      body = {model: engine.model, prompt: prompt.value, stream: true, stream_options: {include_usage: true},
        logprobs: count, ...params.values()};
    } catch (e) {
      error.textContent = e.message;
      return;
    }
    output.replaceChildren(h("span", {class: "prompt"}, prompt.value));
    controller = new AbortController();
    run.disabled = true;
    stop.disabled = false;
    const started = performance.now();
    let firstAt = null;
    let usage = null;
    let finish = null;
    try {
      const response = await api("/v1/completions", {json: body, signal: controller.signal});
      for await (const chunk of sseEvents(response)) {
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (!choice) continue;
        if (choice.text) firstAt ??= performance.now();
        appendTokens(choice.logprobs, choice.text);
        finish = choice.finish_reason || finish;
      }
    } catch (e) {
      if (e.name === "AbortError") finish = "stopped";
      else error.textContent = e.message;
    } finally {
      controller = null;
      run.disabled = false;
      stop.disabled = true;
    }
    const seconds = (performance.now() - (firstAt ?? started)) / 1000;
    meta.textContent = [usage && `${usage.completion_tokens} tokens`,
      firstAt !== null && `TTFT ${Math.round(firstAt - started)} ms`,
      usage?.completion_tokens > 1 && `${((usage.completion_tokens - 1) / seconds).toFixed(1)} tok/s`,
      finish && `finish: ${finish}`].filter(Boolean).join(" · ");
  }
}
