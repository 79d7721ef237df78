// Every data call of the page goes through api(): the engine's base path (this origin for `tokenmill serve`,
// /engines/{id} under `tokenmill playground`), the API key as a Bearer header, and a 401 answered by asking the
// user for the key and trying again. Errors come back as ApiError with the server's own message.

const KEY_STORAGE = "tokenmill-api-key";
let base = "";
let pendingKey = null;

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export function setBase(path) {
  base = path;
}

export function getBase() {
  return base;
}

export function engineLabel() {
  return location.origin + base;
}

// Asks for the key in the page's dialog (once, however many calls are waiting) and stores it for this tab.
export function askKey(reason) {
  if (!pendingKey) {
    const dialog = document.getElementById("key-dialog");
    const input = document.getElementById("key-input");
    document.getElementById("key-reason").textContent = reason;
    input.value = sessionStorage.getItem(KEY_STORAGE) || "";
    pendingKey = new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        sessionStorage.setItem(KEY_STORAGE, input.value.trim());
        pendingKey = null;
        resolve();
      }, {once: true});
    });
    dialog.showModal();
    input.focus();
  }
  return pendingKey;
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? {Authorization: `Bearer ${key}`} : {};
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error.message;
  } catch {
    return `HTTP ${response.status}: ${text.slice(0, 300) || response.statusText}`;
  }
}

// fetch(base + path) with the key; `json` makes it a POST of that body. Resolves to an ok Response.
export async function api(path, {json, method, signal, root = false} = {}) {
  for (;;) {
    const headers = authHeaders();
    if (json !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch((root ? "" : base) + path, {
        method: method || (json !== undefined ? "POST" : "GET"), headers, signal,
        body: json !== undefined ? JSON.stringify(json) : undefined,
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(`the engine at ${engineLabel()} is not reachable (${error.message})`, 0);
    }
    if (response.status === 401) {
      await askKey(await errorMessage(response));
      continue;
    }
    if (!response.ok) throw new ApiError(await errorMessage(response), response.status);
    return response;
  }
}

export async function apiJson(path, options) {
  return (await api(path, options)).json();
}

// The JSON payloads of a server-sent event stream, until [DONE]; an {"error": ...} event throws.
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(event.error.message, event.error.code);
      yield event;
    }
  }
}

// The engine the page talks to: its served model name, once /v1/models has answered, and whether there is one
// (under `tokenmill playground`, an engine that is ready is selected).
export const engine = {model: null, available: true};
