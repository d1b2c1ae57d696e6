// The mint page: connect a wallet, pay (a gasless signature, a USDC transfer, or at /mint the
// x402 402 it was served with), and follow each mint live until it is on chain. Built on
// /static/mintq.js, the same client other sites use. The queue ids live in localStorage, so a
// reload still shows this browser's mints.
import * as mintq from "/static/mintq.js";
import { el, explorerFor, formatDuration, hashView, timeView } from "/static/dom.js";

const STORE = "mintq.queueIds";
const PENDING_TRANSFERS = "mintq.pendingTransfers";
const KEEP = 20;
const QUEUE_REFRESH_MS = 5000;
const STEPS = ["pending", "processing", "completed"];
const REFUND_TEXT = {
  pending: "on its way soon",
  sent: "on its way",
  confirmed: "sent back to you",
  dust: "too small to send back",
  failed: "could not be sent: the seller will look into it",
};
const NETWORK_NAMES = {
  1: "Ethereum",
  10: "Optimism",
  137: "Polygon",
  8453: "Base",
  42161: "Arbitrum One",
  84532: "Base Sepolia",
  11155111: "Sepolia",
  31337: "Local dev chain",
};
const SALE_STATES = {
  upcoming: "Opens soon",
  open: "On sale",
  paused: "Paused",
  sold_out: "Sold out",
  ended: "Ended",
};
const MODE_TEXT = {
  connecting: "Connecting for live updates…",
  events: "Live: updates arrive as they happen.",
  polling: "Live: checking every 2 s.",
  final: "Final.",
};

const $ = (id) => document.getElementById(id);
const provider = window.ethereum || null;
// Served as the x402 paywall (GET or POST /mint with a 402): pay that same 402.
const paywall = location.pathname === "/mint";
let config = null;
let account = null;
let busy = false;

// --- remembered items ------------------------------------------------------------------------

function readList(key) {
  try {
    const value = JSON.parse(localStorage.getItem(key) || "[]");
    return Array.isArray(value) ? value.filter((v) => typeof v === "string") : [];
  } catch {
    return [];
  }
}

function writeList(key, values) {
  try {
    localStorage.setItem(key, JSON.stringify(values.slice(0, KEEP)));
  } catch {
    // Private mode or full: the mint still shows until the page is closed.
  }
}

function remember(queueId) {
  writeList(STORE, [queueId, ...readList(STORE).filter((id) => id !== queueId)]);
}

// --- the offer -------------------------------------------------------------------------------

function networkName(chainId) {
  return NETWORK_NAMES[chainId] || `Chain ${chainId}`;
}

function quantity() {
  return Math.max(1, Math.floor(Number($("quantity").value) || 1));
}

function renderOffer() {
  const q = quantity();
  const total = BigInt(config.price) * BigInt(q);
  $("price").replaceChildren(
    `${mintq.formatUnits(total, 6)} USDC`,
    q > 1 ? el("span", { class: "fact-note" }, `${q} × ${mintq.formatUnits(config.price, 6)} USDC`) : "",
  );
  $("mint-amount").textContent = `${mintq.formatUnits(BigInt(config.mintAmount) * BigInt(q), 18)} tokens`;
  $("network").textContent = networkName(config.chainId);
  renderSale(config.sale);
}

/** The sale's state, where the server has one (GET /config's `sale`). */
function renderSale(sale) {
  $("sale").hidden = !sale;
  const most = (sale && sale.maxQuantity) || 1;
  $("quantity-row").hidden = most <= 1;
  $("quantity").max = String(most);
  $("quantity-hint").textContent = most > 1 ? `Up to ${most} in one payment.` : "";
  if (!sale) return;
  const state = $("sale-state");
  state.textContent = SALE_STATES[sale.state] || sale.state;
  state.className = `status sale-${sale.state}`;
  const parts = [];
  if (sale.maxSupply !== null && sale.maxSupply !== undefined) {
    parts.push(`${sale.remaining ?? sale.maxSupply - (sale.sold || 0)} of ${sale.maxSupply} left.`);
  }
  if (sale.maxPerPayer) parts.push(`At most ${sale.maxPerPayer} per wallet.`);
  if (sale.state === "upcoming" && sale.startsAt) parts.push(`Opens ${new Date(sale.startsAt).toLocaleString()}.`);
  if (sale.state === "open" && sale.endsAt) parts.push(`Closes ${new Date(sale.endsAt).toLocaleString()}.`);
  $("sale-summary").textContent = parts.join(" ");
  const bar = $("sale-bar");
  bar.hidden = !sale.maxSupply;
  if (sale.maxSupply) {
    const sold = sale.maxSupply - (sale.remaining ?? sale.maxSupply);
    bar.setAttribute("aria-valuemax", String(sale.maxSupply));
    bar.setAttribute("aria-valuenow", String(sold));
    bar.firstElementChild.style.width = `${Math.min(100, (100 * sold) / sale.maxSupply)}%`;
  }
  const closed = sale.state && sale.state !== "open";
  $("mint").disabled = closed;
  $("pay-transfer").disabled = closed;
}

async function refreshQueue() {
  try {
    const status = await mintq.queueStatus(config);
    const waiting = status.pending + status.processing;
    const s = status.settings || {};
    $("queue-now").replaceChildren(
      `${waiting} waiting`,
      s.batchIntervalSeconds ? el("span", { class: "fact-note" }, `a batch every ${s.batchIntervalSeconds} s`) : "",
    );
  } catch {
    $("queue-now").textContent = "unknown right now";
  }
  setTimeout(refreshQueue, QUEUE_REFRESH_MS);
}

// --- the wallet --------------------------------------------------------------------------------

async function renderWallet() {
  const state = $("wallet-state");
  if (!provider) {
    state.textContent = mintq.explain("no_wallet");
    $("connect").hidden = true;
    return;
  }
  if (!account) {
    state.textContent = "No wallet connected.";
    $("connect").hidden = false;
    return;
  }
  $("connect").hidden = true;
  const parts = [el("span", {}, "Connected: "), hashView(account, addressLink(account))];
  try {
    const chainId = parseInt(await provider.request({ method: "eth_chainId" }), 16);
    if (chainId !== config.chainId) {
      parts.push(el("span", { class: "warn" }, ` · on ${networkName(chainId)}; Mint switches it to ${networkName(config.chainId)}.`));
    } else {
      const balance = await mintq.usdcBalance(provider, config, account);
      parts.push(el("span", { dataset: { field: "balance" } }, ` · ${mintq.formatUnits(balance, 6)} USDC`));
    }
  } catch {
    // The wallet's extras are a nicety; paying reports its own problems.
  }
  state.replaceChildren(...parts);
}

async function connectWallet() {
  account = await mintq.connect(provider);
  await renderWallet();
  return account;
}

// --- one mint ---------------------------------------------------------------------------------

function explorer() {
  return config ? explorerFor(config.chainId) : null;
}
function txLink(hash) {
  return explorer() && hash ? `${explorer()}/tx/${hash}` : null;
}
function addressLink(address) {
  return explorer() && address ? `${explorer()}/address/${address}` : null;
}

const shown = new WeakMap();

function cardFor(queueId) {
  let card = document.querySelector(`[data-queue-id="${CSS.escape(queueId)}"]`);
  if (!card) {
    card = el("article", { class: "item mint-item", dataset: { queueId } });
    $("mints").prepend(card);
    $("no-mints").hidden = true;
  }
  return card;
}

function steps(status) {
  const at = STEPS.indexOf(status);
  return el(
    "ol",
    { class: "steps" },
    STEPS.map((step, i) =>
      el("li", { class: i < at ? "done" : i === at ? "current" : "", "aria-current": i === at ? "step" : null }, step),
    ),
  );
}

function fillCard(card, item) {
  const key = JSON.stringify(item);
  if (shown.get(card) === key) return;
  shown.set(card, key);
  const row = (label, ...value) => [el("dt", {}, label), el("dd", {}, ...value)];
  const mode = card.querySelector(".live")?.textContent || MODE_TEXT.connecting;
  const waiting = item.status === "pending";
  const quantityText = item.quantity && item.quantity > 1 ? `${item.quantity} mints` : "1 mint";
  card.replaceChildren(
    el(
      "header",
      {},
      el("h3", {}, quantityText, el("span", { class: "muted" }, ` · ${item.paymentType}`)),
      el("span", { class: `status status-${item.status}`, dataset: { field: "status" } }, item.status),
    ),
    STEPS.includes(item.status) && steps(item.status),
    el(
      "dl",
      { class: "fields" },
      waiting && row("Place in queue", el("span", { dataset: { field: "position" } }, String(item.queuePosition ?? "—"))),
      waiting && row("Estimated wait", el("span", { dataset: { field: "wait" } }, formatDuration(item.estimatedWaitSeconds))),
      item.status === "completed" &&
        row("Mint transaction", el("span", { dataset: { field: "mintTx" } }, hashView(item.mintTxHash, txLink(item.mintTxHash)))),
      item.status === "failed" &&
        row("Problem", el("span", { class: "problem-text" }, item.error || "The mint failed; you were not charged for it.")),
      item.status === "refunded" &&
        row("Problem", el("span", { class: "problem-text" }, item.error || "Your payment could not buy a mint; it is paid back.")),
      item.refundAmount &&
        row(
          "Paid back",
          el("span", { dataset: { field: "refund" } }, `${mintq.formatUnits(BigInt(item.refundAmount), 6)} USDC · ${REFUND_TEXT[item.refundStatus] || item.refundStatus}`),
        ),
      item.refundTxHash && row("Refund transaction", hashView(item.refundTxHash, txLink(item.refundTxHash))),
      row("Recipient", hashView(item.recipient, addressLink(item.recipient))),
      row("Queue id", hashView(item.queueId)),
      row("Paid", timeView(item.createdAt)),
      item.completedAt && row("Minted", timeView(item.completedAt)),
    ),
    el("p", { class: "live meta" }, ["completed", "failed", "refunded"].includes(item.status) ? MODE_TEXT.final : mode),
  );
}

function follow(item) {
  const card = cardFor(item.queueId);
  fillCard(card, item);
  mintq.watch(
    config,
    item.queueId,
    (next) => {
      fillCard(card, next);
      if (next.status === "completed" && account) renderWallet();
    },
    (mode) => {
      const live = card.querySelector(".live");
      if (live) live.textContent = MODE_TEXT[mode];
    },
  );
}

async function restore() {
  for (const queueId of readList(STORE).reverse()) {
    try {
      follow(await mintq.getItem(config, queueId));
    } catch (error) {
      if (error.status === 404) writeList(STORE, readList(STORE).filter((id) => id !== queueId));
    }
  }
  // A transfer sent before a reload, whose hash was not yet submitted.
  for (const txHash of readList(PENDING_TRANSFERS)) submitTransfer(txHash).catch(problem);
}

// --- paying --------------------------------------------------------------------------------------

function problem(error) {
  const box = $("problem");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.textContent = error instanceof mintq.MintqError ? error.message : mintq.explain("unknown", { message: String(error.message || error) });
  box.dataset.code = error.code || "unknown";
  box.hidden = false;
}

function progress(text) {
  $("progress").textContent = text;
}

async function guarded(action) {
  if (busy) return;
  busy = true;
  problem(null);
  $("mint").disabled = $("pay-transfer").disabled = true;
  try {
    await action();
  } catch (error) {
    progress("");
    problem(error);
  } finally {
    busy = false;
    $("mint").disabled = $("pay-transfer").disabled = false;
    if (config && config.sale) renderSale(config.sale);
  }
}

function bought(item) {
  remember(item.queueId);
  follow(item);
  progress("Paid. Your mint is in the queue.");
  cardFor(item.queueId).scrollIntoView({ block: "nearest" });
}

async function payGasless() {
  const from = account || (await connectWallet());
  progress("Confirm the payment in your wallet…");
  if (paywall) {
    const { item } = await mintq.payX402(provider, "/mint", { from });
    bought(item);
  } else {
    bought(await mintq.mint(provider, config, { quantity: quantity(), from }));
  }
  renderWallet();
}

async function submitTransfer(txHash) {
  progress("Transfer on chain. Submitting it for your mint…");
  try {
    const item = await mintq.submitTransfer(config, txHash);
    writeList(PENDING_TRANSFERS, readList(PENDING_TRANSFERS).filter((h) => h !== txHash));
    bought(item);
  } catch (error) {
    if (!["tx_not_confirmed", "tx_not_found", "unreachable"].includes(error.code)) {
      // Refused for good: keeping the hash would only repeat the refusal at each reload.
      writeList(PENDING_TRANSFERS, readList(PENDING_TRANSFERS).filter((h) => h !== txHash));
    }
    throw error;
  }
}

async function payByTransfer() {
  const from = account || (await connectWallet());
  progress("Confirm the USDC transfer in your wallet…");
  const txHash = await mintq.sendTransfer(provider, config, { quantity: quantity(), from });
  writeList(PENDING_TRANSFERS, [txHash, ...readList(PENDING_TRANSFERS)]);
  await submitTransfer(txHash);
  renderWallet();
}

// --- start ---------------------------------------------------------------------------------------

$("paywall").hidden = !paywall;
$("connect").addEventListener("click", () => guarded(connectWallet));
$("mint-form").addEventListener("submit", (event) => {
  event.preventDefault();
  guarded(payGasless);
});
$("pay-transfer").addEventListener("click", () => guarded(payByTransfer));
$("quantity").addEventListener("input", () => config && renderOffer());
if (paywall) $("custom").hidden = true; // the 402 is paid by its own x402 header
if (provider && typeof provider.on === "function") {
  provider.on("accountsChanged", (accounts) => {
    account = accounts && accounts.length ? accounts[0] : null;
    renderWallet();
  });
  provider.on("chainChanged", () => renderWallet());
}

mintq
  .readConfig("")
  .then(async (loaded) => {
    config = loaded;
    renderOffer();
    refreshQueue();
    if (provider) {
      // Already allowed before: show the account without asking again.
      const accounts = await provider.request({ method: "eth_accounts" }).catch(() => []);
      account = accounts && accounts.length ? accounts[0] : null;
    }
    renderWallet();
    restore();
  })
  .catch((error) => {
    const box = $("config-error");
    box.textContent = `The sale cannot be loaded: ${error.message} Reload the page to try again.`;
    box.hidden = false;
    $("mint").disabled = $("pay-transfer").disabled = true;
  });
