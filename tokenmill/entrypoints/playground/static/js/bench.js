// The benchmark page: POST /playground/api/bench runs `bench serve` on the server at each chosen rate and
// streams its progress; the results are plotted against the rate (TTFT, TPOT and ITL medians and P99s, and
// throughput) and can be saved as JSON.

import {api, engine, sseEvents} from "./api.js";
import {download, field, h} from "./dom.js";
import {lineChart} from "./charts.js";

export function mountBench(root) {
  const rates = h("input", {id: "bench-rates", value: "1, 4, inf", title: 'requests per second, "inf": all at once'});
  const numPrompts = h("input", {id: "bench-num-prompts", type: "number", min: 1, max: 256, value: 8});
  const inputLen = h("input", {id: "bench-input-len", type: "number", min: 1, value: 32});
  const outputLen = h("input", {id: "bench-output-len", type: "number", min: 1, value: 16});
  const concurrency = h("input", {id: "bench-concurrency", type: "number", min: 1, placeholder: "no limit"});
  const run = h("button", {class: "primary", id: "bench-run", onclick: () => start()}, "Run");
  const exportButton = h("button", {id: "bench-export", disabled: true,
    onclick: () => download("tokenmill-bench.json", JSON.stringify(results, null, 1))}, "Export JSON");
  const progress = h("progress", {id: "bench-progress", value: 0, max: 1});
  const status = h("div", {class: "muted", id: "bench-status"});
  const error = h("div", {class: "error", id: "bench-error"});
  const table = h("table", {id: "bench-table"});
  const charts = h("div", {class: "charts", id: "bench-charts"});
  let results = [];

  root.append(h("div", {class: "panel"}, h("h3", {}, "bench serve against this server"),
    h("div", {class: "row"}, h("div", {}, field("Request rates (req/s, comma-separated)", rates)),
      h("div", {}, field("Prompts per rate", numPrompts)), h("div", {}, field("Input tokens", inputLen)),
      h("div", {}, field("Output tokens", outputLen)), h("div", {}, field("Max concurrency", concurrency))),
    h("div", {class: "row", style: "margin-top: 8px"}, progress, run, exportButton), status, error),
  h("p"), table, h("p"), charts);

  function body() {
    const list = rates.value.split(",").map((r) => r.trim()).filter((r) => r).map((r) => {
      if (r === "inf") return r;
      const rate = Number(r);
      if (!(rate > 0)) throw new Error(`each request rate must be a positive number or "inf", got "${r}"`);
      return rate;
    });
    const whole = (input, name) => {
      const value = Number(input.value);
      if (!Number.isInteger(value) || value < 1) throw new Error(`${name} must be a whole number >= 1`);
      return value;
    };
    const request = {rates: list, num_prompts: whole(numPrompts, "Prompts per rate"),
      input_len: whole(inputLen, "Input tokens"), output_len: whole(outputLen, "Output tokens")};
    if (concurrency.value) request.max_concurrency = whole(concurrency, "Max concurrency");
    return request;
  }

  async function start() {
    error.textContent = "";
    let request;
    try {
      request = body();
    } catch (e) {
      error.textContent = e.message;
      return;
    }
    results = [];
    draw();
    run.disabled = exportButton.disabled = true;
    progress.value = 0;
    try {
      const response = await api("/playground/api/bench", {json: request});
      for await (const event of sseEvents(response)) {
        if (event.type === "progress") {
          const step = request.rates.indexOf(event.rate);
          progress.value = (step + event.done / event.total) / request.rates.length;
          status.textContent = `rate ${event.rate}: ${event.done} / ${event.total} requests`;
        } else if (event.type === "result") {
          results.push(event.summary);
          draw();
        } else if (event.type === "error") {
          error.textContent = event.message;
        } else if (event.type === "done") {
          status.textContent = `done: ${results.length} rates against ${engine.model}`;
        }
      }
    } catch (e) {
      error.textContent = e.message;
    } finally {
      run.disabled = false;
      exportButton.disabled = !results.length;
    }
  }

  function draw() {
    const columns = [["rate", (r) => r.request_rate], ["done", (r) => `${r.completed}/${r.num_prompts}`],
      ["req/s", (r) => r.request_throughput.toFixed(2)], ["out tok/s", (r) => r.output_throughput.toFixed(1)],
      ["TTFT p50 / p99 ms", (r) => `${r.ttft_ms.median.toFixed(0)} / ${r.ttft_ms.p99.toFixed(0)}`],
      ["TPOT p50 / p99 ms", (r) => `${r.tpot_ms.median.toFixed(1)} / ${r.tpot_ms.p99.toFixed(1)}`],
      ["ITL p50 / p99 ms", (r) => `${r.itl_ms.median.toFixed(1)} / ${r.itl_ms.p99.toFixed(1)}`]];
    table.replaceChildren(h("tr", {}, columns.map(([name]) => h("th", {}, name))),
      ...results.map((r) => h("tr", {}, columns.map(([, value]) => h("td", {}, String(value(r)))))));
    if (!results.length) {
      charts.replaceChildren();
      return;
    }
    const xLabels = results.map((r) => String(r.request_rate));
    const latency = (key) => [{name: "median", points: results.map((r, i) => [i, r[key].median])},
      {name: "P99", points: results.map((r, i) => [i, r[key].p99])}];
    charts.replaceChildren(
      lineChart("TTFT (ms) vs request rate", latency("ttft_ms"), {xLabels}),
      lineChart("TPOT (ms) vs request rate", latency("tpot_ms"), {xLabels}),
      lineChart("ITL (ms) vs request rate", latency("itl_ms"), {xLabels}),
      lineChart("Throughput vs request rate", [{name: "output tok/s", points: results.map((r, i) =>
        [i, r.output_throughput])}, {name: "req/s", points: results.map((r, i) => [i, r.request_throughput])}],
      {xLabels}));
  }
}
