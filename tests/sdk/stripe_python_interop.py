"""The official stripe-python SDK against tollgate's Stripe emulator.

Creates a customer, a product, a price and a checkout session with
`stripe.api_base` pointed at the emulator, checks that errors map to the
SDK's exceptions, and verifies a webhook the emulator delivered with
`stripe.Webhook.construct_event`. Run by scripts/test-sdk.
"""

import http.server
import os
import sys
import threading
import time

import stripe

stripe.api_key = "sk_test_sdk_interop"
stripe.api_base = os.environ["EMULATOR_URL"]
stripe.max_network_retries = 0

received = []


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        received.append((body, self.headers["Stripe-Signature"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
threading.Thread(target=server.serve_forever, daemon=True).start()
hook_url = f"http://127.0.0.1:{server.server_address[1]}/hook"

checks = 0


def check(condition, what):
    global checks
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


endpoint = stripe.WebhookEndpoint.create(url=hook_url, enabled_events=["customer.created"])
check(endpoint.secret.startswith("whsec_"), "webhook endpoint returns its secret")

customer = stripe.Customer.create(email="sdk@example.com", metadata={"tollgate_external_id": "sdk_1"})
check(customer.id.startswith("cus_"), "customer id")
check(customer.metadata["tollgate_external_id"] == "sdk_1", "customer metadata")

product = stripe.Product.create(name="SDK product")
price = stripe.Price.create(product=product.id, unit_amount=1200, currency="usd", recurring={"interval": "month"})
check(price.recurring.interval == "month", "recurring price")

session = stripe.checkout.Session.create(
    mode="subscription",
    customer=customer.id,
    line_items=[{"price": price.id, "quantity": 2}],
    success_url="https://example.com/ok?session={CHECKOUT_SESSION_ID}",
    subscription_data={"trial_period_days": 7},
    metadata={"order": "42"},
)
check(session.id.startswith("cs_test_") and session.url, "checkout session with a hosted page URL")
check(session.amount_total == 2400, "line items total")
fetched = stripe.checkout.Session.retrieve(session.id, expand=["line_items"])
check(fetched.line_items.data[0].quantity == 2, "expand line_items")

customers = stripe.Customer.list(limit=1)
check(customers.object == "list" and len(customers.data) == 1, "list")

try:
    stripe.Customer.retrieve("cus_does_not_exist")
    check(False, "404 raises")
except stripe.InvalidRequestError as e:
    check(e.http_status == 404 and e.code == "resource_missing", "404 maps to InvalidRequestError")

try:
    stripe.Customer.create(colour="red")
    check(False, "unknown parameter raises")
except stripe.InvalidRequestError as e:
    check(e.param == "colour", "unknown parameter names the param")

deadline = time.time() + 10
while not received and time.time() < deadline:
    time.sleep(0.05)
check(received, "the emulator delivered a webhook")
body, signature = received[0]
event = stripe.Webhook.construct_event(body, signature, endpoint.secret)
check(event.type == "customer.created" and event.data.object.id == customer.id, "construct_event verifies and parses")
try:
    stripe.Webhook.construct_event(body + b" ", signature, endpoint.secret)
    check(False, "tampered payload fails verification")
except stripe.SignatureVerificationError:
    checks += 1

print(f"stripe-python {stripe.VERSION} against the emulator: {checks} checks passed")
