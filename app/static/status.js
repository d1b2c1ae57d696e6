// The status page: queue counts and recent batches every 3 s, and a lookup that follows a
// queue item live (Server-Sent Events, or polling every 2 s when they are not available).
import { el, explorerFor, formatDuration, getJSON, hashView, timeView } from "/static/dom.js";

const STATUS_REFRESH_MS = 3000;
const POLL_MS = 2000;
const FINAL = new Set(["completed", "failed", "refunded"]);
const MAX_FOLLOWED = 20;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const ADDRESS = /^0x[0-9a-fA-F]{40}$/;

const $ = (id) => document.getElementById(id);
let explorer = null;

const txLink = (hash) => (explorer && hash ? `${explorer}/tx/${hash}` : null);
const addressLink = (address) => (explorer && address ? `${explorer}/address/${address}` : null);

function statusBadge(status) {
  return el("span", { class: `status status-${status}`, dataset: { field: "status" } }, status);
}

// --- counts and batches -------------------------------------------------------------------

let lastBatches = "";

function renderStatus(status) {
  for (const name of ["pending", "processing", "completed", "failed", "refunded"]) {
    $(`count-${name}`).textContent = String(status[name] ?? 0);
  }
  $("oldest-pending").textContent =
    status.oldestPendingAgeSeconds === null ? "none" : formatDuration(status.oldestPendingAgeSeconds);
  const s = status.settings || {};
  $("settings-summary").textContent =
    `${s.paused ? "Paused. " : ""}Batches of up to ${s.maxBatchSize}, ` +
    `every ${s.batchIntervalSeconds} s, ${s.maxInFlight} in flight.`;
  const now = new Date();
  const updated = $("updated-at");
  updated.dateTime = now.toISOString();
  updated.textContent = now.toLocaleTimeString();

  // Rebuild the table only when it changed, so a selection or a "Copied" survives a refresh.
  const batches = status.recentBatches || [];
  const key = JSON.stringify(batches);
  if (key === lastBatches) return;
  lastBatches = key;
  $("no-batches").hidden = batches.length > 0;
  $("batches").hidden = batches.length === 0;
  $("batches").tBodies[0].replaceChildren(
    ...batches.map((b) =>
      el(
        "tr",
        { dataset: { batchId: b.batchId } },
        el("td", {}, hashView(b.txHash, txLink(b.txHash))),
        el("td", { class: "num" }, String(b.nonce)),
        el("td", { class: "num" }, String(b.size)),
        el("td", {}, statusBadge(b.status)),
        el("td", { class: "num" }, b.gasUsed === null ? "—" : b.gasUsed.toLocaleString()),
        el("td", {}, timeView(b.createdAt)),
      ),
    ),
  );
}

const SALE_STATES = {
  upcoming: "Upcoming",
  open: "Open",
  paused: "Paused",
  sold_out: "Sold out",
  ended: "Ended",
};

/** The sale (GET /config's `sale`): its state, and how much of the supply is taken. */
function renderSale(sale) {
  $("sale").hidden = !sale;
  if (!sale) return;
  const state = $("sale-state");
  state.textContent = SALE_STATES[sale.state] || sale.state;
  state.className = `status sale-${sale.state}`;
  const parts = [`${sale.sold} sold, ${sale.reserved} taken`];
  if (sale.maxSupply !== null) parts.push(`of ${sale.maxSupply}; ${sale.remaining} left`);
  if (sale.maxPerPayer) parts.push(`at most ${sale.maxPerPayer} per payer`);
  $("sale-summary").textContent = `${parts.join(" ")}.`;
  const bar = $("sale-bar");
  bar.hidden = sale.maxSupply === null;
  if (sale.maxSupply !== null) {
    bar.setAttribute("aria-valuemax", String(sale.maxSupply));
    bar.setAttribute("aria-valuenow", String(sale.reserved));
    bar.firstElementChild.style.width = `${Math.min(100, (100 * sale.reserved) / Math.max(sale.maxSupply, 1))}%`;
  }
}

async function refreshStatus() {
  const problem = $("status-error");
  try {
    const [status, config] = await Promise.all([getJSON("/queue/status"), getJSON("/config")]);
    renderStatus(status);
    renderSale(config.sale);
    problem.hidden = true;
  } catch (error) {
    problem.textContent = `Could not load the queue status: ${error.message}. Retrying.`;
    problem.hidden = false;
  }
}

function keepRefreshing() {
  // setTimeout after each answer, so a slow server never gets overlapping requests.
  refreshStatus().finally(() => setTimeout(keepRefreshing, STATUS_REFRESH_MS));
}

// --- following one item ---------------------------------------------------------------------

/**
 * Call onItem with each new state of a queue item until it is final: from
 * /queue/item/<id>/events when the server has it, else by polling. Returns stop().
 */
function follow(queueId, onItem, onMode) {
  const path = `/queue/item/${encodeURIComponent(queueId)}`;
  let stopped = false;
  let source = null;
  let timer = null;

  const stop = () => {
    stopped = true;
    if (source) source.close();
    clearTimeout(timer);
  };
  const handle = (item) => {
    if (stopped) return;
    onItem(item);
    if (FINAL.has(item.status)) {
      stop();
      onMode("final");
    }
  };
  const poll = async () => {
    try {
      handle(await getJSON(path));
    } catch {
      // A missed poll is retried at the next one.
    }
    if (!stopped) timer = setTimeout(poll, POLL_MS);
  };
  const startPolling = () => {
    onMode("polling");
    poll();
  };

  if (!("EventSource" in window)) {
    startPolling();
    return stop;
  }
  onMode("connecting");
  source = new EventSource(`${path}/events`);
  source.addEventListener("open", () => onMode("events"));
  source.addEventListener("status", (event) => {
    try {
      handle(JSON.parse(event.data));
    } catch {
      // Not a queue item: ignore it, the next event or poll brings the state.
    }
  });
  source.addEventListener("error", () => {
    if (stopped) return; // the server closes the stream after the final state
    source.close();
    source = null;
    startPolling();
  });
  return stop;
}

const MODE_TEXT = {
  connecting: "Connecting for live updates…",
  events: "Live: updates arrive as they happen.",
  polling: "Live: checking every 2 s.",
  final: "Final.",
};

function itemCard(item) {
  const card = el("article", { class: "item", dataset: { queueId: item.queueId } });
  fillCard(card, item);
  return card;
}

const shownItems = new WeakMap();

function fillCard(card, item) {
  // The card is in a live region: redraw it only when the item changed, or every poll is read out.
  const key = JSON.stringify(item);
  if (shownItems.get(card) === key) return;
  shownItems.set(card, key);
  const row = (label, ...value) => [el("dt", {}, label), el("dd", {}, ...value)];
  const waiting = item.status === "pending";
  const mode = card.querySelector(".live")?.textContent || "";
  card.replaceChildren(
    el(
      "header",
      {},
      el("h3", {}, "Queue item ", el("code", {}, item.queueId)),
      statusBadge(item.status),
    ),
    el(
      "dl",
      { class: "fields" },
      waiting && row("Position", String(item.queuePosition ?? "—")),
      waiting && row("Estimated wait", formatDuration(item.estimatedWaitSeconds)),
      row("Payer", hashView(item.payer, addressLink(item.payer))),
      row("Recipient", hashView(item.recipient, addressLink(item.recipient))),
      row("Payment", `${item.paymentType} `, hashView(item.paymentId)),
      row("Mint transaction", hashView(item.mintTxHash, txLink(item.mintTxHash))),
      item.retryCount > 0 && row("Retries", String(item.retryCount)),
      item.error && row("Error", el("span", { class: "problem-text" }, item.error)),
      row("Created", timeView(item.createdAt)),
      row("Updated", timeView(item.updatedAt)),
      item.completedAt && row("Completed", timeView(item.completedAt)),
    ),
    el("p", { class: "live meta" }, FINAL.has(item.status) ? MODE_TEXT.final : mode),
  );
}

// --- lookup -----------------------------------------------------------------------------------

let stopFollowing = [];

function followCard(card, item) {
  if (FINAL.has(item.status) || stopFollowing.length >= MAX_FOLLOWED) return;
  stopFollowing.push(
    follow(
      item.queueId,
      (next) => fillCard(card, next),
      (mode) => {
        card.querySelector(".live").textContent = MODE_TEXT[mode];
      },
    ),
  );
}

async function lookup(query) {
  for (const stop of stopFollowing) stop();
  stopFollowing = [];
  const result = $("lookup-result");
  const problem = $("lookup-problem");
  const input = $("lookup-input");
  const q = query.trim();
  const bad = (message) => {
    problem.textContent = message;
    problem.hidden = false;
    input.setAttribute("aria-invalid", "true");
    result.replaceChildren();
  };
  if (!UUID.test(q) && !ADDRESS.test(q)) {
    bad("Enter a queue id (a UUID) or a payer address (0x and 40 hex digits).");
    return;
  }
  problem.hidden = true;
  input.removeAttribute("aria-invalid");
  history.replaceState(null, "", `#q=${encodeURIComponent(q)}`);
  result.replaceChildren(el("p", { class: "muted" }, "Looking up…"));
  try {
    if (UUID.test(q)) {
      const item = await getJSON(`/queue/item/${encodeURIComponent(q)}`);
      const card = itemCard(item);
      result.replaceChildren(card);
      followCard(card, item);
    } else {
      const { payer, items } = await getJSON(`/queue/payer/${encodeURIComponent(q)}`);
      const cards = items.map(itemCard);
      result.replaceChildren(
        el(
          "p",
          { class: "muted" },
          `${items.length} ${items.length === 1 ? "item" : "items"} paid by `,
          hashView(payer, addressLink(payer)),
          items.length ? ", newest first." : ".",
        ),
        ...cards,
      );
      items.forEach((item, i) => followCard(cards[i], item));
    }
  } catch (error) {
    bad(error.status === 404 ? "No queue item has this id." : `Lookup failed: ${error.message}`);
  }
}

// --- start ------------------------------------------------------------------------------------

$("lookup-form").addEventListener("submit", (event) => {
  event.preventDefault();
  lookup($("lookup-input").value);
});

getJSON("/config")
  .then((config) => {
    explorer = explorerFor(config.chainId);
  })
  .catch(() => {}); // links are a nicety; the page works without them

keepRefreshing();

const initial = new URLSearchParams(location.hash.slice(1)).get("q");
if (initial) {
  $("lookup-input").value = initial;
  lookup(initial);
}
