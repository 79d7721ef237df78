// Structured outputs (choice, regex, JSON schema, grammar: the server's `structured_outputs`) and tool calling
// (preset tools, custom tools written as JSON with their parameters' JSON schema, tool_choice,
// parallel_tool_calls) as request fields. Each panel's values() throws an Error naming what is wrong.

import {field, h} from "./dom.js";

const EXAMPLES = {
  choice: "positive\nnegative\nneutral",
  regex: "[A-Z][a-z]+ [0-9]{4}",
  json: JSON.stringify({type: "object", properties: {name: {type: "string"}, age: {type: "integer"}},
    required: ["name", "age"]}, null, 2),
  grammar: 'root ::= "yes" | "no" | "maybe"',
};

export const PRESET_TOOLS = [
  {name: "get_weather", description: "Get the current weather in a city",
    parameters: {type: "object", properties: {city: {type: "string"}, unit: {type: "string", enum: ["celsius",
      "fahrenheit"]}}, required: ["city"]}},
  {name: "calculator", description: "Evaluate an arithmetic expression",
    parameters: {type: "object", properties: {expression: {type: "string"}}, required: ["expression"]}},
  {name: "web_search", description: "Search the web",
    parameters: {type: "object", properties: {query: {type: "string"}}, required: ["query"]}},
];

const CUSTOM_EXAMPLE = JSON.stringify([{name: "get_time", description: "The time in a time zone",
  parameters: {type: "object", properties: {timezone: {type: "string"}}, required: ["timezone"]}}], null, 2);

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${what} is not valid JSON: ${error.message}`);
  }
}

export function structuredForm() {
  const kind = h("select", {name: "structured-kind"},
    ["none", "choice", "regex", "json", "grammar"].map((k) => h("option", {value: k}, k === "json" ? "JSON schema" : k)));
  const spec = h("textarea", {name: "structured-spec", rows: 6, hidden: true});
  const hint = h("div", {class: "muted", hidden: true});
  kind.addEventListener("change", () => {
    spec.hidden = hint.hidden = kind.value === "none";
    spec.value = EXAMPLES[kind.value] || "";
    hint.textContent = kind.value === "choice" ? "one choice per line" : kind.value === "grammar" ? "EBNF (GBNF)" : "";
  });
  const element = h("div", {class: "panel"}, h("h3", {}, "Structured output"), kind, hint, spec);

  function values() {
    const text = spec.value;
    switch (kind.value) {
      case "none": return {};
      case "choice": {
        const choices = text.split("\n").map((c) => c.trim()).filter((c) => c);
        if (!choices.length) throw new Error("structured output: give at least one choice");
        return {structured_outputs: {choice: choices}};
      }
      case "json": {
        const schema = parseJson(text, "the JSON schema");
        if (typeof schema !== "object" || schema === null || Array.isArray(schema)) {
          throw new Error("the JSON schema must be an object");
        }
        return {structured_outputs: {json: schema}};
      }
      default:
        if (!text.trim()) throw new Error(`structured output: the ${kind.value} is empty`);
        return {structured_outputs: {[kind.value]: text}};
    }
  }
  return {element, values, kind, spec};
}

function checkTool(tool, i) {
  const where = `custom tool ${i + 1}`;
  if (typeof tool !== "object" || tool === null) throw new Error(`${where} must be an object`);
  if (typeof tool.name !== "string" || !/^[A-Za-z0-9_-]{1,64}$/.test(tool.name)) {
    throw new Error(`${where}: name must be 1-64 letters, digits, _ or -`);
  }
  const parameters = tool.parameters ?? {type: "object", properties: {}};
  if (typeof parameters !== "object" || parameters.type !== "object") {
    throw new Error(`${where} (${tool.name}): parameters must be a JSON schema with "type": "object"`);
  }
  return {type: "function", function: {name: tool.name, description: tool.description || "", parameters}};
}

export function toolsForm() {
  const presets = PRESET_TOOLS.map((tool) => h("input", {type: "checkbox", name: `tool-${tool.name}`}));
  const custom = h("textarea", {name: "custom-tools", rows: 4, placeholder: CUSTOM_EXAMPLE});
  const customError = h("div", {class: "error"});
  const choice = h("select", {name: "tool-choice"});
  const parallel = h("input", {type: "checkbox", name: "parallel-tool-calls", checked: true});

  const tools = () => {
    const list = PRESET_TOOLS.filter((_, i) => presets[i].checked).map((tool, i) => checkTool(tool, i));
    if (custom.value.trim()) {
      const parsed = parseJson(custom.value, "the custom tools");
      (Array.isArray(parsed) ? parsed : [parsed]).forEach((tool, i) => list.push(checkTool(tool, i)));
    }
    return list;
  };
  const refreshChoices = () => {
    let names = [];
    try {
      names = tools().map((t) => t.function.name);
      customError.textContent = "";
    } catch (error) {
      customError.textContent = error.message;
    }
    const selected = choice.value;
    choice.replaceChildren(...["auto", "required", "none"].map((c) => h("option", {value: c}, c)),
      ...names.map((n) => h("option", {value: `function:${n}`}, `call ${n}`)));
    if ([...choice.options].some((o) => o.value === selected)) choice.value = selected;
  };
  presets.forEach((box) => box.addEventListener("change", refreshChoices));
  custom.addEventListener("input", refreshChoices);
  refreshChoices();

  const element = h("div", {class: "panel"}, h("h3", {}, "Tools"),
    PRESET_TOOLS.map((tool, i) => h("label", {class: "check", title: tool.description}, presets[i], ` ${tool.name}`)),
    field("Custom tools (JSON: [{name, description, parameters: JSON schema}])", custom), customError,
    field("tool_choice", choice), h("label", {class: "check"}, parallel, " parallel_tool_calls"));

  function values() {
    const list = tools();
    if (!list.length) return {};
    const body = {tools: list, parallel_tool_calls: parallel.checked};
    body.tool_choice = choice.value.startsWith("function:")
      ? {type: "function", function: {name: choice.value.slice(9)}} : choice.value;
    return body;
  }
  return {element, values, presets, choice};
}
