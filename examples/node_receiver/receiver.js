// mpesa-wsgi payment webhooks, received with Node's http module and the standardwebhooks
// package (npm ci).
//
//   WEBHOOK_SECRET=whsec_… PORT=8005 INBOX_FILE=inbox.jsonl node receiver.js
//
// POST /mpesa/events: verify the signature (the library checks the HMAC and that the
// timestamp is within 5 minutes), record the event once per webhook-id in the inbox (a
// JSON-lines file, read back at start-up), answer 204, then do the work. A redelivery of
// an event already recorded is answered 204 and not processed again.
"use strict";

const fs = require("node:fs");
const http = require("node:http");
const { Webhook } = require("standardwebhooks");

const HOST = process.env.HOST || "127.0.0.1";
const PORT = Number(process.env.PORT || 8005);
const INBOX = process.env.INBOX_FILE || "inbox.jsonl";
const MAX_BODY = 64 * 1024; // an event is a few hundred bytes

const webhook = new Webhook(process.env.WEBHOOK_SECRET || ""); // throws when unset

// The webhook-ids already recorded (this process is the inbox's only writer).
const seen = new Set(
  (fs.existsSync(INBOX) ? fs.readFileSync(INBOX, "utf8") : "")
    .split("\n")
    .filter(Boolean)
    .map((line) => JSON.parse(line).webhook_id),
);

function fulfil(event) {
  // Your shop's work: mark the order paid, email the customer... It runs after the
  // answer, so a slow step never makes the gateway wait (it gives up after 10 s).
  const tx = event.data;
  const what = tx.id ?? tx.transaction_id ?? "-"; // a receipt may match no payment
  console.log(`processed ${event.type} ${what} status=${tx.status ?? "-"} receipt=${tx.receipt || "-"}`);
}

function onEvent(req, body, res) {
  let event;
  try {
    event = webhook.verify(body, req.headers); // headers arrive lower-cased
  } catch {
    console.warn("webhook refused: the signature did not verify");
    res.writeHead(400).end();
    return;
  }
  const id = req.headers["webhook-id"];
  const tx = event?.data;
  // payment.* events carry the payment (data.id); receipt.received a receipt (data.receipt).
  if (typeof event?.type !== "string" || typeof (tx?.id ?? tx?.receipt) !== "string") {
    console.warn(`webhook ${id} refused: signed, but not an event of the gateway's`);
    res.writeHead(400).end(); // never recorded, so never processed
    return;
  }
  if (seen.has(id)) {
    console.log(`webhook ${id} already recorded: acknowledged, not processed again`);
    res.writeHead(204).end();
    return;
  }
  const record = {
    webhook_id: id,
    type: event.type,
    transaction_id: tx.id ?? tx.transaction_id ?? null, // a receipt: the payment it matched
    status: tx.status ?? null,
    receipt: tx.receipt ?? null,
    received_at: new Date().toISOString(),
  };
  try {
    fs.appendFileSync(INBOX, `${JSON.stringify(record)}\n`); // on disk before the 2xx
  } catch (err) {
    console.error(`cannot record webhook ${id}: ${err.code || err.message}`);
    res.writeHead(500).end(); // not recorded: the gateway tries again later
    return;
  }
  seen.add(id);
  res.writeHead(204).end();
  setImmediate(fulfil, event);
}

const server = http.createServer((req, res) => {
  if (req.url !== "/mpesa/events") {
    res.writeHead(404).end();
    return;
  }
  if (req.method !== "POST") {
    res.writeHead(405, { Allow: "POST" }).end();
    return;
  }
  const chunks = [];
  let size = 0;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY) {
      res.writeHead(413, { Connection: "close" }).end();
      req.destroy();
    } else {
      chunks.push(chunk);
    }
  });
  req.on("end", () => onEvent(req, Buffer.concat(chunks), res));
});

server.listen(PORT, HOST, () => console.log(`receiving webhooks on http://${HOST}:${PORT}/mpesa/events`));
