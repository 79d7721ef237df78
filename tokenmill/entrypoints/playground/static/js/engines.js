// The Engines tab of `tokenmill playground`: start `tokenmill serve` processes (a model path or hub id and the
// common flags), stop them, pick the one the other tabs talk to (through /engines/{id}/...), and follow its log.

import {api, apiJson, engine, setBase, sseEvents} from "./api.js";
import {field, h} from "./dom.js";

const POLL_MS = 1500;
const SELECTED_STORAGE = "tokenmill-engine";

export function mountEngines(root, {showBanner, loadModel}) {
  const model = h("input", {id: "engine-model", placeholder: "default: the embedded SmolLM2-135M-Instruct"});
  const flags = {
    "--max-model-len": h("input", {id: "engine-max-model-len", placeholder: "the model's"}),
    "--max-num-seqs": h("input", {id: "engine-max-num-seqs", placeholder: "256"}),
    "--gpu-memory-utilization": h("input", {placeholder: "0.9"}),
    "--kv-cache-memory-bytes": h("input", {id: "engine-kv-bytes", placeholder: "from --gpu-memory-utilization"}),
    "--dtype": h("select", {}, ["", "auto", "float32", "bfloat16", "float16"].map((d) =>
      h("option", {value: d}, d || "default"))),
    "--tool-call-parser": h("select", {}, ["", "hermes", "llama3_json"].map((p) => h("option", {value: p}, p || "none"))),
    "--reasoning-parser": h("select", {}, ["", "qwen3", "deepseek_r1"].map((p) => h("option", {value: p},
      p || "none"))),
  };
  const extra = h("input", {id: "engine-extra", placeholder: "more `tokenmill serve` flags, e.g. --enforce-eager"});
  const start = h("button", {class: "primary", id: "engine-start", onclick: () => startEngine()}, "Start engine");
  const error = h("div", {class: "error", id: "engine-error"});
  const list = h("table", {id: "engine-list"});
  const logs = h("div", {class: "logs", id: "engine-logs"});
  const logTitle = h("h3", {}, "Log");
  let selected = localStorage.getItem(SELECTED_STORAGE);
  let engines = [];
  let logController = null;

  root.append(h("div", {class: "layout"},
    h("div", {}, h("div", {class: "panel"}, h("h3", {}, "Engines"), list), h("p"),
      h("div", {class: "panel"}, logTitle, logs)),
    h("div", {class: "panel"}, h("h3", {}, "Start an engine"), field("Model (path, .gguf or hub id)", model),
      Object.entries(flags).map(([flag, input]) => field(flag, input)), field("Other flags", extra),
      h("p"), start, error)));

  async function startEngine() {
    error.textContent = "";
    const args = [];
    for (const [flag, input] of Object.entries(flags)) {
      if (input.value.trim()) args.push(flag, input.value.trim());
    }
    args.push(...extra.value.split(/\s+/).filter((a) => a));
    start.disabled = true;
    try {
      const started = await apiJson("/api/engines", {json: {model: model.value.trim() || null, args}, root: true});
      select(started.id);
      await refresh();
    } catch (e) {
      error.textContent = e.message;
    } finally {
      start.disabled = false;
    }
  }

  async function stopEngine(id) {
    if (id === selected) engine.available = false;  // no more calls to an engine on its way out
    try {
      await api(`/api/engines/${id}`, {method: "DELETE", root: true});
    } catch (e) {
      error.textContent = e.message;
    }
    await refresh();
  }

  function select(id) {
    const changed = id !== selected;
    selected = id;
    localStorage.setItem(SELECTED_STORAGE, id || "");
    setBase(id ? `/engines/${id}` : "");
    engine.model = null;
    if (changed || !logController) followLog(id);
  }

  async function followLog(id) {
    logController?.abort();
    logs.replaceChildren();
    logController = id ? new AbortController() : null;
    if (!id) return;
    logTitle.textContent = `Log of ${id}`;
    const controller = logController;
    try {
      const response = await api(`/api/engines/${id}/logs`, {root: true, signal: controller.signal});
      for await (const event of sseEvents(response)) {
        const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
        logs.append(event.line + "\n");
        if (atBottom) logs.scrollTop = logs.scrollHeight;
      }
    } catch (e) {
      if (e.name !== "AbortError") logs.append(`[log: ${e.message}]\n`);
    }
  }

  function draw() {
    list.replaceChildren(h("tr", {}, ["id", "model", "port", "status", ""].map((c) => h("th", {}, c))),
      ...engines.map((e) => h("tr", {class: e.id === selected ? "selected" : "", "data-engine": e.id},
        h("td", {}, e.id === selected ? `▶ ${e.id}` : e.id), h("td", {}, e.model), h("td", {}, String(e.port)),
        h("td", {class: `status-${e.status.split(" ")[0]}`}, e.status),
        h("td", {}, h("button", {disabled: e.id === selected, onclick: () => select(e.id) || refresh()}, "Use"), " ",
          e.status.startsWith("exited") ? null : h("button", {class: "danger", onclick: () => stopEngine(e.id)},
            "Stop")))));
  }

  async function refresh() {
    try {
      engines = await apiJson("/api/engines", {root: true});
    } catch (e) {
      showBanner(e.message);
      return;
    }
    if (selected && !engines.some((e) => e.id === selected)) select(null);
    if (!selected && engines.length) select(engines[engines.length - 1].id);
    const current = engines.find((e) => e.id === selected);
    const ready = current?.status === "ready";
    engine.available = ready;
    if (!current) showBanner("No engine is running: start one in the Engines tab.");
    else if (!ready) showBanner(`Engine ${current.id} (${current.model}) is ${current.status}.`);
    else if (!engine.model) await loadModel();
    draw();
  }

  async function poll() {
    await refresh();
    setTimeout(poll, POLL_MS);
  }
  if (selected) select(selected);
  poll();
}
