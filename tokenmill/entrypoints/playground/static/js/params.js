// The sampling parameters form the chat and completions pages share. An empty field is not sent, so the
// server's defaults (the model's generation config) apply; a bad value is named before anything is sent.

import {field, h} from "./dom.js";

const NUMBERS = [
  // [request field, label, parse, default shown]
  ["temperature", "Temperature", parseFloat, ""],
  ["top_p", "Top p", parseFloat, ""],
  ["top_k", "Top k", parseInt, ""],
  ["max_tokens", "Max tokens", parseInt, "256"],
  ["seed", "Seed", parseInt, ""],
  ["presence_penalty", "Presence penalty", parseFloat, ""],
  ["frequency_penalty", "Frequency penalty", parseFloat, ""],
];

export function samplingForm(prefix) {
  const inputs = {};
  const fields = NUMBERS.map(([name, label, , value]) => {
    inputs[name] = h("input", {name: `${prefix}-${name}`, type: "text", inputmode: "decimal", value,
      placeholder: "server default"});
    return field(label, inputs[name]);
  });
  const stop = h("input", {name: `${prefix}-stop`, placeholder: 'e.g. \\n\\n, "END"', title:
    "comma-separated stop strings; \\n is a newline"});
  const element = h("div", {class: "panel"}, h("h3", {}, "Parameters"), fields, field("Stop", stop));

  // The request fields set in the form; throws an Error naming the field for a value that is not a number.
  function values() {
    const body = {};
    for (const [name, label, parse] of NUMBERS) {
      const text = inputs[name].value.trim();
      if (!text) continue;
      const value = parse(text);
      if (!Number.isFinite(value) || String(value) !== String(Number(text))) {
        throw new Error(`${label} (${name}) must be a number, got "${text}"`);
      }
      body[name] = value;
    }
    const stops = stop.value.split(",").map((s) => s.trim().replace(/^"(.*)"$/, "$1").replace(/\\n/g, "\n"))
      .filter((s) => s);
    if (stops.length) body.stop = stops;
    return body;
  }
  return {element, values, inputs};
}
