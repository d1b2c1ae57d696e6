// mintq's browser client: read the sale's config, pay from an EIP-1193 wallet (an EIP-3009
// signature, an x402 header, or a plain USDC transfer), submit, and watch the mint.
//
//   import * as mintq from "https://mint.example/static/mintq.js";
//   const config = await mintq.readConfig("https://mint.example");
//   const item = await mintq.mint(window.ethereum, config);
//   mintq.watch(config, item.queueId, (item) => render(item));
//
// No dependencies: the wallet does all the cryptography (eth_signTypedData_v4 hashes and signs
// the EIP-712 message), and the only ABI this needs is four fixed-layout calls, so a general
// Ethereum library (and the build step it would bring) would be all weight and no use here.

const FINAL = new Set(["completed", "failed", "refunded"]);
const POLL_MS = 2000;
const DEFAULT_VALID_SECONDS = 3600;
const SELECTOR = {
  name: "0x06fdde03",
  version: "0x54fd4d50",
  balanceOf: "0x70a08231",
  transfer: "0xa9059cbb",
};
const TRANSFER_WITH_AUTHORIZATION = [
  { name: "from", type: "address" },
  { name: "to", type: "address" },
  { name: "value", type: "uint256" },
  { name: "validAfter", type: "uint256" },
  { name: "validBefore", type: "uint256" },
  { name: "nonce", type: "bytes32" },
];
const EIP712_DOMAIN = [
  { name: "name", type: "string" },
  { name: "version", type: "string" },
  { name: "chainId", type: "uint256" },
  { name: "verifyingContract", type: "address" },
];

/**
 * A refusal, from the API (`code` is its `error`) or from the wallet (`code` is one of
 * `signature_rejected`, `wrong_chain`, `no_wallet`, `no_account`, `wallet_error`).
 * `message` is the sentence to show a buyer.
 */
export class MintqError extends Error {
  constructor(code, message, { status = null, details = {}, retryAfter = null } = {}) {
    super(message);
    this.name = "MintqError";
    this.code = code;
    this.status = status;
    this.details = details;
    this.retryAfter = retryAfter;
  }
}

// --- the API ---------------------------------------------------------------------------------

function apiUrl(base, path) {
  return `${(base || "").replace(/\/$/, "")}${path}`;
}

async function request(base, path, options = {}) {
  let response;
  try {
    response = await fetch(apiUrl(base, path), {
      cache: "no-store",
      credentials: "omit",
      ...options,
      headers: { Accept: "application/json", ...(options.headers || {}) },
    });
  } catch {
    throw new MintqError("unreachable", "The mint server cannot be reached. Check your connection and try again.");
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok && response.status !== 402) throw apiError(response, body);
  return { response, body };
}

function apiError(response, body) {
  const code = (body && body.error) || `http_${response.status}`;
  const retryAfter = Number(response.headers.get("Retry-After")) || null;
  const details = (body && body.details) || {};
  return new MintqError(code, explain(code, { details, retryAfter, status: response.status, message: body && body.message }), {
    status: response.status,
    details,
    retryAfter,
  });
}

/** GET /config: chainId, network, usdc, token, payTo, price, mintAmount (and `sale` if any). */
export async function readConfig(base = "") {
  const { body } = await request(base, "/config");
  return { ...body, base };
}

/** GET /queue/item/<queueId>. */
export async function getItem(config, queueId) {
  const { body } = await request(config.base, `/queue/item/${encodeURIComponent(queueId)}`);
  return body;
}

/** GET /queue/status: the counts of pending, processing, completed and failed items. */
export async function queueStatus(config) {
  const { body } = await request(config.base, "/queue/status");
  return body;
}

/** POST /mint with a JSON payment (`{paymentType: "gasless"|"custom", ...}`); the queue item. */
export async function submit(config, payment) {
  const { response, body } = await request(config.base, "/mint", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payment),
  });
  if (response.status === 402) throw apiError(response, body);
  return body;
}

// --- the wallet ------------------------------------------------------------------------------

async function wallet(provider, method, params = []) {
  if (!provider || typeof provider.request !== "function") {
    throw new MintqError("no_wallet", explain("no_wallet"));
  }
  try {
    return await provider.request({ method, params });
  } catch (error) {
    throw walletError(error);
  }
}

function walletError(error) {
  if (error instanceof MintqError) return error;
  const code = error && (error.code ?? error.data?.originalError?.code);
  if (code === 4001) return new MintqError("signature_rejected", explain("signature_rejected"));
  if (code === 4100) return new MintqError("no_account", explain("no_account"));
  return new MintqError("wallet_error", `Your wallet reported a problem: ${(error && error.message) || error}`);
}

/** Ask the wallet for an account; its address. */
export async function connect(provider) {
  const accounts = await wallet(provider, "eth_requestAccounts");
  if (!accounts || !accounts.length) throw new MintqError("no_account", explain("no_account"));
  return accounts[0];
}

/** Put the wallet on the sale's chain (wallet_switchEthereumChain) unless it is there. */
export async function ensureChain(provider, config) {
  const current = parseInt(await wallet(provider, "eth_chainId"), 16);
  if (current === config.chainId) return;
  try {
    await provider.request({
      method: "wallet_switchEthereumChain",
      params: [{ chainId: `0x${config.chainId.toString(16)}` }],
    });
  } catch (error) {
    const unknown = error && (error.code === 4902 || error.data?.originalError?.code === 4902);
    throw new MintqError("wrong_chain", explain("wrong_chain", { config, current, unknown }));
  }
  const now = parseInt(await wallet(provider, "eth_chainId"), 16);
  if (now !== config.chainId) throw new MintqError("wrong_chain", explain("wrong_chain", { config, current: now }));
}

async function call(provider, to, data) {
  return wallet(provider, "eth_call", [{ to, data }, "latest"]);
}

function word(hex) {
  return hex.replace(/^0x/, "").toLowerCase().padStart(64, "0");
}

function decodeString(hex) {
  const raw = hex.replace(/^0x/, "");
  const length = parseInt(raw.slice(64, 128), 16);
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i++) bytes[i] = parseInt(raw.slice(128 + 2 * i, 130 + 2 * i), 16);
  return new TextDecoder().decode(bytes);
}

/** The EIP-712 domain USDC checks signatures against, read from the token itself. */
export async function tokenDomain(provider, config) {
  const [name, version] = await Promise.all([
    call(provider, config.usdc, SELECTOR.name),
    call(provider, config.usdc, SELECTOR.version),
  ]);
  return {
    name: decodeString(name),
    version: decodeString(version),
    chainId: config.chainId,
    verifyingContract: config.usdc,
  };
}

/** The USDC balance of `address`, in atomic units (a BigInt). */
export async function usdcBalance(provider, config, address) {
  return BigInt(await call(provider, config.usdc, SELECTOR.balanceOf + word(address)));
}

function randomNonce() {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  return `0x${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/**
 * Sign an EIP-3009 TransferWithAuthorization of `value` to `to` with the wallet
 * (eth_signTypedData_v4). Nothing moves until someone submits it.
 */
export async function signAuthorization(provider, { domain, from, to, value, validSeconds = DEFAULT_VALID_SECONDS }) {
  const authorization = {
    from,
    to,
    value: String(value),
    validAfter: "0",
    validBefore: String(Math.floor(Date.now() / 1000) + validSeconds),
    nonce: randomNonce(),
  };
  const typedData = {
    types: { EIP712Domain: EIP712_DOMAIN, TransferWithAuthorization: TRANSFER_WITH_AUTHORIZATION },
    primaryType: "TransferWithAuthorization",
    domain,
    message: authorization,
  };
  const signature = await wallet(provider, "eth_signTypedData_v4", [from, JSON.stringify(typedData)]);
  return { authorization, signature };
}

async function checkFunds(provider, config, from, value) {
  const balance = await usdcBalance(provider, config, from);
  if (balance < value) {
    throw new MintqError("insufficient_funds", explain("insufficient_funds", { config, balance, value }));
  }
}

function quantityOf(config, quantity) {
  const q = Math.max(1, Math.floor(Number(quantity) || 1));
  const most = (config.sale && config.sale.maxQuantity) || 1;
  if (q > most) throw new MintqError("quantity_too_large", explain("quantity_too_large", { details: { maxQuantity: most } }));
  return q;
}

/**
 * Buy `quantity` mints without gas: check the chain and the balance, sign the authorization
 * in the wallet, and post it as a gasless payment. The new queue item.
 */
export async function mint(provider, config, { quantity = 1, from = null } = {}) {
  const q = quantityOf(config, quantity);
  const payer = from || (await connect(provider));
  await ensureChain(provider, config);
  const value = BigInt(config.price) * BigInt(q);
  await checkFunds(provider, config, payer, value);
  const domain = await tokenDomain(provider, config);
  const signed = await signAuthorization(provider, { domain, from: payer, to: config.payTo, value });
  return submit(config, { paymentType: "gasless", ...signed, ...(q > 1 ? { quantity: q } : {}) });
}

/**
 * Pay with a plain USDC transfer sent by the wallet; resolves with its transaction hash once
 * the chain has it (then `submitTransfer` turns it into a mint).
 */
export async function sendTransfer(provider, config, { quantity = 1, from = null } = {}) {
  const q = quantityOf(config, quantity);
  const payer = from || (await connect(provider));
  await ensureChain(provider, config);
  const value = BigInt(config.price) * BigInt(q);
  await checkFunds(provider, config, payer, value);
  const data = SELECTOR.transfer + word(config.payTo) + word(value.toString(16));
  const txHash = await wallet(provider, "eth_sendTransaction", [{ from: payer, to: config.usdc, data }]);
  for (;;) {
    const receipt = await wallet(provider, "eth_getTransactionReceipt", [txHash]);
    if (receipt) {
      if (parseInt(receipt.status, 16) !== 1) throw new MintqError("tx_failed", explain("tx_failed"));
      return txHash;
    }
    await sleep(1000);
  }
}

/** Submit a USDC transfer's hash as a custom payment, waiting while it is not yet confirmed. */
export async function submitTransfer(config, txHash, { attempts = 30 } = {}) {
  for (let i = 1; ; i++) {
    try {
      return await submit(config, { paymentType: "custom", txHash });
    } catch (error) {
      const early = ["tx_not_confirmed", "tx_not_found"].includes(error.code);
      if (!early || i >= attempts) throw error;
      await sleep(2000);
    }
  }
}

// --- x402 -------------------------------------------------------------------------------------

function base64Json(value) {
  const bytes = new TextEncoder().encode(JSON.stringify(value));
  return btoa(String.fromCharCode(...bytes));
}

function fromBase64Json(text) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

/**
 * Pay an x402 resource (version 2, scheme `exact`) from the wallet: read its 402, sign what it
 * asks for, and send it again with `PAYMENT-SIGNATURE`. The resource's answer (for mintq's
 * `/mint`, the queue item) and the decoded `PAYMENT-RESPONSE`.
 */
export async function payX402(provider, url, { from = null, method = "POST" } = {}) {
  const first = await fetch(url, { method, credentials: "omit", headers: { Accept: "application/json" } });
  const header = first.headers.get("PAYMENT-REQUIRED");
  if (first.status !== 402 || !header) throw new MintqError("not_payable", "This address did not ask for an x402 payment.");
  const required = fromBase64Json(header);
  const accepted = required.accepts.find((a) => a.scheme === "exact" && a.network.startsWith("eip155:"));
  if (!accepted) throw new MintqError("unsupported_scheme", "This resource asks for a payment this wallet cannot make.");
  const config = {
    chainId: Number(accepted.network.split(":")[1]),
    usdc: accepted.asset,
    payTo: accepted.payTo,
    price: accepted.amount,
  };
  const payer = from || (await connect(provider));
  await ensureChain(provider, config);
  await checkFunds(provider, config, payer, BigInt(accepted.amount));
  const domain = {
    name: accepted.extra.name,
    version: accepted.extra.version,
    chainId: config.chainId,
    verifyingContract: accepted.asset,
  };
  const signed = await signAuthorization(provider, {
    domain,
    from: payer,
    to: accepted.payTo,
    value: accepted.amount,
    validSeconds: accepted.maxTimeoutSeconds || DEFAULT_VALID_SECONDS,
  });
  const payload = {
    x402Version: 2,
    resource: required.resource,
    accepted,
    payload: signed,
    ...(required.extensions ? { extensions: required.extensions } : {}),
  };
  const paid = await fetch(url, {
    method,
    credentials: "omit",
    headers: { Accept: "application/json", "PAYMENT-SIGNATURE": base64Json(payload) },
  });
  let body = null;
  try {
    body = await paid.json();
  } catch {
    body = null;
  }
  if (!paid.ok) throw apiError(paid, body);
  const receipt = paid.headers.get("PAYMENT-RESPONSE");
  return { item: body, settlement: receipt ? fromBase64Json(receipt) : null };
}

// --- watching ----------------------------------------------------------------------------------

/**
 * Call onItem with each new state of a queue item until it is final: live from its
 * Server-Sent Events stream, else by polling. onMode hears "connecting", "events", "polling"
 * and "final". Returns stop().
 */
export function watch(config, queueId, onItem, onMode = () => {}) {
  const path = apiUrl(config.base, `/queue/item/${encodeURIComponent(queueId)}`);
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
      handle(await getItem(config, queueId));
    } catch {
      // A missed poll is retried at the next one.
    }
    if (!stopped) timer = setTimeout(poll, POLL_MS);
  };
  const startPolling = () => {
    onMode("polling");
    poll();
  };
  if (typeof EventSource === "undefined") {
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
      // Not a queue item: the next event or poll brings the state.
    }
  });
  source.addEventListener("error", () => {
    if (stopped) return; // the server ends the stream after the final state
    source.close();
    source = null;
    startPolling();
  });
  return stop;
}

// --- words for buyers ----------------------------------------------------------------------------

/** Atomic units as a decimal string: formatUnits(1500000n, 6) is "1.5". */
export function formatUnits(amount, decimals) {
  const value = BigInt(amount);
  const scale = 10n ** BigInt(decimals);
  const whole = value / scale;
  const fraction = (value % scale).toString().padStart(decimals, "0").replace(/0+$/, "");
  return fraction ? `${whole}.${fraction}` : `${whole}`;
}

const usdc = (amount) => `${formatUnits(amount, 6)} USDC`;

/** A refusal's code as a sentence for a buyer. */
export function explain(code, { config = null, details = {}, retryAfter = null, balance = null, value = null, current = null, unknown = false, message = null } = {}) {
  switch (code) {
    case "no_wallet":
      return "No wallet was found in this browser. Install a browser wallet (or open this page in your wallet's browser) and try again.";
    case "no_account":
      return "Your wallet did not share an account with this page. Unlock it, allow this site, and try again.";
    case "signature_rejected":
      return "You declined in your wallet, so nothing was paid and nothing was minted. Press the button again when you are ready.";
    case "wrong_chain": {
      const want = config ? `chain ${config.chainId}` : "the sale's chain";
      if (unknown) return `Your wallet does not know ${want}. Add that network to your wallet, then try again.`;
      return `Your wallet is on ${current ? `chain ${current}` : "another chain"}, but this sale is on ${want}. Switch networks in your wallet (nothing was paid).`;
    }
    case "wrong_network":
      return "The payment was made on another network than this sale's. Switch your wallet to the sale's network and try again.";
    case "insufficient_funds":
    case "insufficient_payment":
    case "settlement_would_fail":
      if (balance !== null && value !== null) {
        return `Not enough USDC: this costs ${usdc(value)} and your wallet holds ${usdc(balance)}. Add USDC to this address and try again.`;
      }
      return "Not enough USDC in your wallet for this mint. Add USDC and try again; nothing was charged.";
    case "sold_out":
      return "Sold out: there are no mints left in this sale. Nothing was charged.";
    case "sale_not_started":
      return "The sale has not started yet. Nothing was charged; come back when it opens.";
    case "sale_ended":
      return "The sale has ended. Nothing was charged.";
    case "payer_limit_reached":
      return "This wallet already holds as many mints as the sale allows per buyer. Nothing was charged.";
    case "quantity_too_large":
      return `You can buy at most ${details.maxQuantity ?? 1} in one payment.`;
    case "rate_limited":
      return `Too many tries in a short time. Wait ${retryAfter ? `${retryAfter} s` : "a moment"} and try again; nothing was charged.`;
    case "signature_invalid":
      return "The signature from your wallet did not check out for this payment, so nothing was charged. Try again; if it repeats, your wallet may not support this kind of signature.";
    case "authorization_used":
      return "This payment was already used. Start a new mint.";
    case "authorization_expired":
    case "authorization_expires_too_soon":
      return "The signed payment expired before it could be used. Try again.";
    case "tx_failed":
      return "Your USDC transfer failed on chain, so nothing was paid. Try again.";
    case "tx_not_confirmed":
    case "tx_not_found":
      return "Your transfer is not confirmed on chain yet. Wait a few seconds and submit it again.";
    case "wrong_recipient":
    case "wrong_amount":
    case "wrong_token":
      return "That payment does not match this sale (recipient, amount or token). Nothing was minted for it.";
    case "chain_unavailable":
    case "database_unavailable":
    case "redis_unavailable":
      return `The mint server is busy or briefly down. Try again in ${retryAfter ? `${retryAfter} s` : "a moment"}; nothing was charged.`;
    default:
      return message || "The mint could not be made. Nothing was charged; try again.";
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
