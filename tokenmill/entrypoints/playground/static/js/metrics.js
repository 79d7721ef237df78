// The live server view: /metrics (Prometheus text, vLLM's names) read every second. Gauges are shown as they
// are; counters become rates between two reads (throughput in tokens/s, the prefix cache's hit rate over the
// last interval). The last five minutes are charted.

import {api, engine} from "./api.js";
import {h} from "./dom.js";
import {lineChart} from "./charts.js";

const INTERVAL_MS = 1000;
const HISTORY = 300;

// Prometheus text -> {sample name: value summed over label sets}; histogram buckets are skipped.
export function parsePrometheus(text) {
  const values = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([^\s{]+)(\{.*\})?\s+(\S+)/);
    if (!match || match[1].endsWith("_bucket")) continue;
    values[match[1]] = (values[match[1]] || 0) + Number(match[3]);
  }
  return values;
}

export function mountMetrics(root, isActive) {
  const cards = h("div", {class: "cards", id: "metrics-cards"});
  const charts = h("div", {class: "charts", id: "metrics-charts"});
  const error = h("div", {class: "error"});
  root.append(cards, error, charts);
  const history = [];  // {t, running, waiting, kv, hitRate, promptTps, genTps}
  let previous = null;
  const started = performance.now();

  function sample(values, now) {
    const get = (name) => values[name] || 0;
    const point = {t: (now - started) / 1000, running: get("vllm:num_requests_running"),
      waiting: get("vllm:num_requests_waiting"), kv: 100 * get("vllm:kv_cache_usage_perc"),
      queries: get("vllm:prefix_cache_queries_total"), hits: get("vllm:prefix_cache_hits_total"),
      prompt: get("vllm:prompt_tokens_total"), generation: get("vllm:generation_tokens_total"),
      hitRate: 0, promptTps: 0, genTps: 0};
    if (previous) {
      const seconds = point.t - previous.t;
      const queried = point.queries - previous.queries;
      point.hitRate = queried > 0 ? (100 * (point.hits - previous.hits)) / queried : previous.hitRate;
      point.promptTps = Math.max(0, point.prompt - previous.prompt) / seconds;
      point.genTps = Math.max(0, point.generation - previous.generation) / seconds;
    }
    previous = point;
    history.push(point);
    if (history.length > HISTORY) history.shift();
  }

  function draw() {
    const last = history[history.length - 1];
    const card = (title, value, id) => h("div", {class: "card", id}, h("div", {class: "muted"}, title),
      h("div", {class: "value"}, value));
    const totalHitRate = last.queries ? `${((100 * last.hits) / last.queries).toFixed(1)}%` : "–";
    cards.replaceChildren(card("Running", String(last.running), "metric-running"),
      card("Waiting", String(last.waiting), "metric-waiting"), card("KV cache", `${last.kv.toFixed(1)}%`, "metric-kv"),
      card("Prefix hits (total)", totalHitRate, "metric-hits"),
      card("Generation", `${last.genTps.toFixed(1)} tok/s`, "metric-gen"));
    const series = (key) => history.map((p) => [p.t, p[key]]);
    const seconds = (v) => `${Math.round(v)}s`;
    charts.replaceChildren(
      lineChart("Requests", [{name: "running", points: series("running")}, {name: "waiting",
        points: series("waiting")}], {yMax: 2, xFormat: seconds}),
      lineChart("KV cache usage (%)", [{name: "KV used", points: series("kv")}], {yMax: 10, xFormat: seconds}),
      lineChart("Prefix cache hit rate (%)", [{name: "hits / queried tokens", points: series("hitRate")}],
        {yMax: 100, xFormat: seconds}),
      lineChart("Throughput (tokens/s)", [{name: "generation", points: series("genTps")}, {name: "prompt",
        points: series("promptTps")}], {yMax: 1, xFormat: seconds}));
  }

  async function poll() {
    if (!engine.available) {
      setTimeout(poll, INTERVAL_MS);
      return;
    }
    try {
      const text = await (await api("/metrics")).text();
      sample(parsePrometheus(text), performance.now());
      error.textContent = "";
      if (isActive()) draw();
    } catch (e) {
      error.textContent = `metrics: ${e.message}`;
    }
    setTimeout(poll, INTERVAL_MS);
  }
  poll();
  return {redraw: () => history.length && draw()};
}
