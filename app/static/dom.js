// Small helpers shared by the mint, status and docs pages. No framework, no build step.
// Everything from the API reaches the page as text nodes, never as HTML.

/** Build an element: el("a", {href: "/docs", class: "x"}, "text", otherNode). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

/** An API error with the `{error, message, details}` body the API answers. */
export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
  }
}

/** GET a JSON document; throws ApiError for an error answer, TypeError when unreachable. */
export async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

export function shortHash(hash) {
  return hash.length > 14 ? `${hash.slice(0, 6)}…${hash.slice(-4)}` : hash;
}

/**
 * A hash or address shown explorer style: shortened, the full value in its title and a
 * copy button; a link when an explorer is known for the chain.
 */
export function hashView(value, href) {
  if (!value) return el("span", { class: "muted" }, "—");
  const label = el("code", { class: "hash-text", title: value }, shortHash(value));
  const button = el("button", {
    type: "button",
    class: "copy",
    title: "Copy",
    "aria-label": `Copy ${value}`,
    onclick: () => copy(value, button, label),
  }, "Copy");
  return el(
    "span",
    { class: "hash", dataset: { full: value } },
    href ? el("a", { href, rel: "noreferrer" }, label) : label,
    button,
  );
}

async function copy(value, button, label) {
  try {
    await navigator.clipboard.writeText(value);
    button.textContent = "Copied";
  } catch {
    // No clipboard (an insecure origin, or refused): show the whole value, selected.
    label.textContent = value;
    const range = document.createRange();
    range.selectNodeContents(label);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    button.textContent = "Selected";
  }
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
}

/** "42 s", "3 min 5 s", "2 h 1 min". */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** A <time> with the local date and time, the ISO value in datetime and title. */
export function timeView(iso) {
  if (!iso) return el("span", { class: "muted" }, "—");
  const date = new Date(iso);
  return el("time", { datetime: iso, title: iso }, date.toLocaleString());
}

// Explorers of the public chains mintq may run on; the dev chain has none.
const EXPLORERS = {
  1: "https://etherscan.io",
  10: "https://optimistic.etherscan.io",
  137: "https://polygonscan.com",
  8453: "https://basescan.org",
  42161: "https://arbiscan.io",
  84532: "https://sepolia.basescan.org",
  11155111: "https://sepolia.etherscan.io",
};

/** The block explorer of a chain, or null. */
export function explorerFor(chainId) {
  return EXPLORERS[chainId] || null;
}
