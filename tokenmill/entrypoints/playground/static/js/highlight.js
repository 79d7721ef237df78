// A small code highlighter: one regex pass marks comments, strings, numbers and keywords (the union of the
// common languages' keywords is close enough for model output). Returns escaped HTML.

import {escapeHtml} from "./dom.js";

const KEYWORDS = new Set(("as async await break case catch class const continue def default del do elif else " +
  "enum export extends false fn for from func function if impl import in interface let match mut new nil none " +
  "null package pass pub public private protected raise return self static struct super switch this throw true " +
  "try type typeof use var void while with yield True False None lambda not and or is int float str bool char " +
  "double long string select where insert update delete create table").split(" "));

const TOKEN = new RegExp([
  String.raw`(\/\/[^\n]*|#[^\n]*|\/\*[\s\S]*?\*\/|--[^\n]*)`,  // comments
  String.raw`("(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|\`(?:\\.|[^\`\\])*\`)`,  // strings
  String.raw`\b(\d+(?:\.\d+)?(?:e[+-]?\d+)?|0x[0-9a-f]+)\b`,  // numbers
  String.raw`\b([A-Za-z_]\w*)\b`,  // words
].join("|"), "gi");

// Languages whose "#" is not a comment, or where "--" is not; others take both (harmless in prose code).
const HASH_NOT_COMMENT = new Set(["c", "cpp", "c++", "css", "rust", "js", "javascript", "ts", "typescript", "go"]);

export function highlight(code, language = "") {
  const lang = language.toLowerCase();
  let html = "";
  let last = 0;
  for (const match of code.matchAll(TOKEN)) {
    const [text, comment, string, number, word] = match;
    let cls = null;
    if (comment && !(HASH_NOT_COMMENT.has(lang) && text.startsWith("#")) && !(lang !== "sql" && lang !== "lua" &&
        text.startsWith("--"))) cls = "tok-com";
    else if (string) cls = "tok-str";
    else if (number) cls = "tok-num";
    else if (word && KEYWORDS.has(word)) cls = "tok-kw";
    if (!cls) continue;
    html += escapeHtml(code.slice(last, match.index)) + `<span class="${cls}">${escapeHtml(text)}</span>`;
    last = match.index + text.length;
  }
  return html + escapeHtml(code.slice(last));
}
