// The playground's entry: tabs (by URL hash), the API key button, the engine's model name, and the banner that
// says when the engine cannot be reached. The page is served by `tokenmill serve` (mode "serve": the engine is
// this origin) or by `tokenmill playground` (mode "manager": the Engines tab picks which engine the tabs use).

import {ApiError, apiJson, askKey, engine, engineLabel} from "./api.js";
import {mountBench} from "./bench.js";
import {mountChat} from "./chat.js";
import {mountCompletions} from "./completions.js";
import {mountEngines} from "./engines.js";
import {mountMetrics} from "./metrics.js";

const HEALTH_INTERVAL_MS = 3000;
const mode = document.querySelector('meta[name="tokenmill-mode"]').content;
const banner = document.getElementById("banner");
let current = null;

function showBanner(message) {
  banner.textContent = message || "";
  banner.hidden = !message;
}

function showTab() {
  const names = [...document.querySelectorAll("#tabs a")].map((a) => a.dataset.tab)
    .filter((name) => mode === "manager" || name !== "engines");
  current = names.includes(location.hash.slice(1)) ? location.hash.slice(1) : "chat";
  for (const link of document.querySelectorAll("#tabs a")) link.classList.toggle("active", link.dataset.tab === current);
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.id === `tab-${current}`);
  if (current === "metrics") metrics.redraw();
}

// The served model's name (the requests' "model"); an error in the banner if the engine does not answer.
export async function loadModel() {
  try {
    const models = await apiJson("/v1/models");
    engine.model = models.data[0].id;
    document.getElementById("model-name").textContent = `${engine.model} · ${engineLabel()}`;
    showBanner("");
  } catch (error) {
    engine.model = null;
    showBanner(error instanceof ApiError ? error.message : String(error));
  }
}

// Under `tokenmill serve`: /health every few seconds; the banner says when the engine is down, and why.
async function watchHealth() {
  let message = "";
  try {
    const response = await fetch("/health");
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      message = `The engine is not healthy: ${body.error?.message || `HTTP ${response.status}`}`;
    }
  } catch (error) {
    message = `The engine at ${engineLabel()} is not reachable (${error.message}). Is \`tokenmill serve\` ` +
      "still running? This page retries every few seconds.";
  }
  const wasDown = !engine.available;
  engine.available = !message;
  if (message) showBanner(message);
  else if (wasDown || !engine.model) await loadModel();
  setTimeout(watchHealth, HEALTH_INTERVAL_MS);
}

if (mode === "manager") document.body.classList.add("manager");
document.getElementById("key-button").addEventListener("click", () => askKey("The server's API key (--api-key)."));
mountChat(document.getElementById("tab-chat"));
mountCompletions(document.getElementById("tab-completions"));
const metrics = mountMetrics(document.getElementById("tab-metrics"), () => current === "metrics");
mountBench(document.getElementById("tab-bench"));
window.addEventListener("hashchange", showTab);
showTab();
if (mode === "manager") {
  mountEngines(document.getElementById("tab-engines"), {showBanner, loadModel});
} else {
  watchHealth();
}
