<?php
// mpesa-wsgi payment webhooks, received in plain PHP (8.0+, no framework, no Composer).
//
//   WEBHOOK_SECRET=whsec_… INBOX_FILE=/var/lib/shop/mpesa-inbox.jsonl \
//       php -S 127.0.0.1:8004 receiver.php
//
// POST /mpesa/events: verify the Standard Webhooks signature (HMAC-SHA256 of
// "<webhook-id>.<webhook-timestamp>.<raw body>", timestamp within 5 minutes), record the
// event once per webhook-id in the inbox (a JSON-lines file under flock), answer 204.
// A redelivery of an event already recorded is answered 204 and not processed again.
declare(strict_types=1);

const TOLERANCE_S = 300;       // Standard Webhooks: refuse timestamps over 5 minutes off
const MAX_BODY = 65536;        // an event is a few hundred bytes

function answer(int $status): void
{
    http_response_code($status);
    header('Content-Length: 0');
    exit;
}

/** Is one of the offered `v1,<base64>` signatures ours? Constant-time comparison. */
function signature_ok(string $key, string $id, string $timestamp, string $body, string $offered): bool
{
    if ($id === '' || !ctype_digit($timestamp) || abs(time() - (int) $timestamp) > TOLERANCE_S) {
        return false;  // a stale (or future) timestamp is a replay, even if correctly signed
    }
    $expected = base64_encode(hash_hmac('sha256', "$id.$timestamp.$body", $key, true));
    foreach (explode(' ', $offered) as $versioned) {
        [$version, $signature] = array_pad(explode(',', $versioned, 2), 2, '');
        if ($version === 'v1' && hash_equals($expected, $signature)) {
            return true;
        }
    }
    return false;
}

/** Append $record to the inbox unless its webhook_id is there already; true if new.
 *  The exclusive lock makes "look, then append" one step for concurrent requests. */
function record_once(string $inbox, array $record): bool
{
    $file = fopen($inbox, 'c+');  // create if missing, never truncate
    if ($file === false || !flock($file, LOCK_EX)) {
        throw new RuntimeException('cannot open or lock the inbox');
    }
    try {
        while (($line = fgets($file)) !== false) {
            if ((json_decode($line, true)['webhook_id'] ?? null) === $record['webhook_id']) {
                return false;
            }
        }
        fseek($file, 0, SEEK_END);
        fwrite($file, json_encode($record, JSON_UNESCAPED_SLASHES) . "\n");
        fflush($file);
        return true;
    } finally {
        flock($file, LOCK_UN);
        fclose($file);
    }
}

if (parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH) !== '/mpesa/events') {
    answer(404);
}
if ($_SERVER['REQUEST_METHOD'] !== 'POST') {
    header('Allow: POST');
    answer(405);
}
// The signing key: the base64 after "whsec_" in the endpoint's secret.
$secret = getenv('WEBHOOK_SECRET') ?: '';
$key = strncmp($secret, 'whsec_', 6) === 0 ? base64_decode(substr($secret, 6), true) : false;
if (!$key) {
    error_log('WEBHOOK_SECRET must be set to the endpoint\'s whsec_… secret');
    answer(500);  // the gateway keeps the event and tries again later
}
$body = file_get_contents('php://input', false, null, 0, MAX_BODY + 1);
$id = $_SERVER['HTTP_WEBHOOK_ID'] ?? '';
if (strlen($body) > MAX_BODY || !signature_ok($key, $id, $_SERVER['HTTP_WEBHOOK_TIMESTAMP'] ?? '',
                                              $body, $_SERVER['HTTP_WEBHOOK_SIGNATURE'] ?? '')) {
    error_log('webhook refused: the signature did not verify');
    answer(400);
}

$event = json_decode($body, true);
$data = is_array($event) ? ($event['data'] ?? null) : null;
// payment.* events carry the payment (data.id); receipt.received a receipt (data.receipt).
if (!is_string($event['type'] ?? null) || !is_string($data['id'] ?? $data['receipt'] ?? null)) {
    error_log("webhook $id refused: signed, but not an event of the gateway's");
    answer(400);  // never recorded, so never processed
}
$txId = $data['id'] ?? $data['transaction_id'] ?? null;  // a receipt: the payment it matched
$new = record_once(getenv('INBOX_FILE') ?: __DIR__ . '/inbox.jsonl', [
    'webhook_id' => $id,
    'type' => $event['type'],
    'transaction_id' => $txId,
    'status' => $data['status'] ?? null,
    'receipt' => $data['receipt'] ?? null,
    'received_at' => gmdate('Y-m-d\TH:i:s\Z'),
]);
if ($new) {
    // The work for a new event: keep it short here (the gateway waits at most 10 s), or
    // leave it to a worker that reads the inbox. Mark the order paid, email the customer...
    error_log("processed {$event['type']} " . ($txId ?? '-') . ' status='
              . ($data['status'] ?? '-') . ' receipt=' . ($data['receipt'] ?? '-'));
} else {
    error_log("webhook $id already recorded: acknowledged, not processed again");
}
answer(204);
