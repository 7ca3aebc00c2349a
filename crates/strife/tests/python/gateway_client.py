#!/usr/bin/env python3
"""Drives a running Strife gateway from Python grpcio: a second gRPC stack,
with stubs generated at run time from the repository's proto/ directory.

    gateway_client.py DIR ADDR [--proto PROTO_DIR]

DIR is the cluster's directory (`strife up --dir DIR`): the client
certificate is read from DIR/certs (ca.pem, client.pem, client.key). ADDR is
the gateway's address (host:port). It expects a fresh cluster with the sample
accounts (user1@BankA holds 1000.00). Prints one line per check and stops at
the first failure: exit 0 when every check passed, 1 on a failed check, 2 on
a usage error, 3 when a Python package is missing.

It is also a worked example of integrating with the gateway from another
language: mutual TLS with the client certificate and the `gateway.strife`
name, the `authorization: bearer <token>` metadata, and the error details of
the rich error model (google.rpc.Status in `grpc-status-details-bin`).
"""

import argparse
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

try:
    import grpc
    from google.protobuf import descriptor_pool
    from google.rpc import error_details_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    from grpc_status import rpc_status
    from grpc_tools import protoc
except ImportError as missing:
    REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
    print(
        f"gateway_client.py: missing Python package ({missing}); run scripts/test, which "
        f"installs them into target/tools/venv, or pip install -r {REQUIREMENTS}",
        file=sys.stderr,
    )
    sys.exit(3)

# The repository's proto/ directory, from crates/strife/tests/python/.
PROTO_DIR_DEFAULT = Path(__file__).resolve().parents[4] / "proto"
# The DNS name in the gateway's certificate.
GATEWAY_TLS_NAME = "gateway.strife"
# Upper bound for connecting and for each call.
CALL_TIMEOUT_S = 30
# Bound on the pages followed in ListPayments.
PAGES_MAX = 20
ERROR_DOMAIN = "strife"

# The services the gateway serves: reflection must list exactly these,
# besides its own grpc.reflection.* services.
SERVED_SERVICES = {
    "strife.gateway.v1.SessionService",
    "strife.gateway.v1.PaymentsService",
    "strife.gateway.v1.RegistryService",
    "strife.gateway.v1.AdminService",
    "grpc.health.v1.Health",
}
REFLECTION_V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


class CheckFailed(Exception):
    pass


# What the program is checking now, for the failure line.
current_step = "start"


def step(label):
    global current_step
    current_step = label


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def ok(message):
    print(f"ok: {message}", flush=True)


def generate_stubs(proto_dir, out_dir):
    """Compiles every .proto under proto_dir to Python modules in out_dir,
    with grpc_tools' copy of the well-known types (google/protobuf/*.proto)
    on the include path."""
    import importlib.resources

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    check(protos, f"no .proto file under {proto_dir}")
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_dir}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    check(protoc.main(args) == 0, f"grpc_tools.protoc failed on {', '.join(protos)}")
    sys.path.insert(0, str(out_dir))
    from strife.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    return gateway_pb2, gateway_pb2_grpc, protos


def secure_channel(cluster_dir, address):
    """Mutual TLS with the cluster's CA and its client certificate."""
    certs = cluster_dir / "certs"
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(certs / "ca.pem").read_bytes(),
            private_key=(certs / "client.key").read_bytes(),
            certificate_chain=(certs / "client.pem").read_bytes(),
        )
    except OSError as err:
        raise CheckFailed(f"reading the client certificate in {certs}: {err}") from err
    # The gateway's certificate names gateway.strife, not the address dialled.
    options = [("grpc.ssl_target_name_override", GATEWAY_TLS_NAME)]
    return grpc.secure_channel(address, credentials, options=options)


def error_details(err):
    """The google.rpc.Status of a failed call, as {detail type: message}."""
    try:
        status = rpc_status.from_call(err)
    except ValueError as bad:
        raise CheckFailed(f"grpc-status-details-bin disagrees with the call's status: {bad}") from bad
    check(status is not None, f"{err.code().name} without google.rpc.Status details: {err.details()!r}")
    details = {}
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.RetryInfo,
    ):
        for packed in status.details:
            if packed.Is(kind.DESCRIPTOR):
                message = kind()
                packed.Unpack(message)
                details[kind] = message
    return details


def expect_error(call, code, reason):
    """Runs `call`, which must fail with `code` and an ErrorInfo of the
    gateway's domain with `reason`; returns the error's details."""
    try:
        call()
    except grpc.RpcError as err:
        check(err.code() == code, f"expected {code.name} ({reason}), got {err.code().name}: {err.details()!r}")
        details = error_details(err)
        info = details.get(error_details_pb2.ErrorInfo)
        check(info is not None, f"{code.name} without an ErrorInfo: {err.details()!r}")
        check(info.domain == ERROR_DOMAIN, f"ErrorInfo domain {info.domain!r}, expected {ERROR_DOMAIN!r}")
        check(info.reason == reason, f"ErrorInfo reason {info.reason!r}, expected {reason!r}")
        return details
    raise CheckFailed(f"expected {code.name} ({reason}), but the call succeeded")


def bearer(token):
    # Lower-case scheme on purpose: the gateway matches it case-insensitively.
    return (("authorization", f"bearer {token}"),)


class Gateway:
    """The stubs, the channel and the generated message types."""

    def __init__(self, channel, pb, pb_grpc):
        self.pb = pb
        self.channel = channel
        self.session = pb_grpc.SessionServiceStub(channel)
        self.payments = pb_grpc.PaymentsServiceStub(channel)

    def login(self, user, bank, password):
        return self.session.Login(
            self.pb.LoginRequest(bank=bank, user=user, password=password), timeout=CALL_TIMEOUT_S
        )

    def balance(self, token):
        return self.payments.GetBalance(self.pb.GetBalanceRequest(), metadata=bearer(token), timeout=CALL_TIMEOUT_S)

    def pay(self, token, payment_id, user, bank, amount):
        request = self.pb.PayRequest(
            payment_id=payment_id, payee=self.pb.Account(user=user, bank=bank), amount=amount
        )
        return self.payments.Pay(request, metadata=bearer(token), timeout=CALL_TIMEOUT_S)

    def list_all(self, token, page_size):
        """Follows next_page_token to the end; returns the pages."""
        pages, page_token = [], ""
        for _ in range(PAGES_MAX):
            page = self.payments.ListPayments(
                self.pb.ListPaymentsRequest(page_size=page_size, page_token=page_token),
                metadata=bearer(token),
                timeout=CALL_TIMEOUT_S,
            )
            pages.append(page)
            page_token = page.next_page_token
            if not page_token:
                return pages
        raise CheckFailed(f"ListPayments still had a next_page_token after {PAGES_MAX} pages")


def check_balance(gw, token, want, who):
    b = gw.balance(token)
    got = (b.account.user, b.account.bank, b.balance, b.available)
    check(got == (*who, want, want), f"GetBalance: expected {who} {want}/{want}, got {got}")


def run_checks(gw):
    pb = gw.pb
    status_name = pb.PaymentStatus.Name
    reason_name = pb.DeclineReason.Name

    step("SessionService.Login user1@BankA")
    login = gw.login("user1", "BankA", "pass1")
    check(login.token, "Login answered no token")
    check(login.HasField("expire_time"), "Login answered no expire_time")
    expires = login.expire_time.ToDatetime(tzinfo=timezone.utc)
    check(expires > datetime.now(timezone.utc), f"expire_time {expires} is in the past")
    token = login.token
    ok(f"SessionService.Login user1@BankA: a token until {expires:%Y-%m-%dT%H:%M:%SZ}")

    step("Login with a wrong password")
    expect_error(lambda: gw.login("user1", "BankA", "not-the-password"), grpc.StatusCode.UNAUTHENTICATED,
                 "WRONG_CREDENTIALS")
    ok("Login with a wrong password: UNAUTHENTICATED, ErrorInfo WRONG_CREDENTIALS")

    step("GetBalance")
    check_balance(gw, token, "1000.00", ("user1", "BankA"))
    ok("GetBalance with `authorization: bearer <token>`: 1000.00 / 1000.00")

    step("Pay 12.50 to user2@BankB")
    first = str(uuid.uuid4())
    r = gw.pay(token, first, "user2", "BankB", "12.50")
    got = (r.payment_id, status_name(r.status), reason_name(r.reason), r.replayed)
    check(got == (first, "PAYMENT_STATUS_COMMITTED", "DECLINE_REASON_UNSPECIFIED", False), f"Pay: {got}")
    ok("Pay 12.50 to user2@BankB: COMMITTED, replayed false")

    step("Pay again with the same id")
    r = gw.pay(token, first, "user2", "BankB", "12.50")
    got = (r.payment_id, status_name(r.status), r.replayed)
    check(got == (first, "PAYMENT_STATUS_COMMITTED", True), f"Pay again with the same id: {got}")
    check_balance(gw, token, "987.50", ("user1", "BankA"))
    ok("the same Pay again: COMMITTED, replayed true; balance 987.50")

    step("Pay with the same id for 13.00")
    details = expect_error(lambda: gw.pay(token, first, "user2", "BankB", "13.00"),
                           grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_ID_REUSED")
    failure = details.get(error_details_pb2.PreconditionFailure)
    check(failure is not None, "PAYMENT_ID_REUSED without a PreconditionFailure")
    violations = [(v.type, v.subject) for v in failure.violations]
    check(violations == [("PAYMENT_ID_REUSED", "amount")],
          f"PreconditionFailure should name only the amount, got {violations}")
    ok("the same id for 13.00: FAILED_PRECONDITION, PreconditionFailure names \"amount\"")

    step("Pay -1")
    details = expect_error(lambda: gw.pay(token, str(uuid.uuid4()), "user2", "BankB", "-1"),
                           grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    bad = details.get(error_details_pb2.BadRequest)
    check(bad is not None, "INVALID_ARGUMENT without a BadRequest")
    fields = [v.field for v in bad.field_violations]
    check("amount" in fields, f"BadRequest should name the field \"amount\", names {fields}")
    ok("Pay -1: INVALID_ARGUMENT, BadRequest names \"amount\"")

    step("Pay 5000 (above the balance)")
    declined = str(uuid.uuid4())
    r = gw.pay(token, declined, "user2", "BankB", "5000")
    got = (status_name(r.status), reason_name(r.reason), r.replayed)
    check(got == ("PAYMENT_STATUS_DECLINED", "DECLINE_REASON_INSUFFICIENT_FUNDS", False), f"Pay 5000: {got}")
    check_balance(gw, token, "987.50", ("user1", "BankA"))
    ok("Pay 5000: DECLINED, DECLINE_REASON_INSUFFICIENT_FUNDS; nothing moved")

    step("Pay 5 more")
    # Seven payments in all, newest first: (id, amount as answered, status).
    made = [(first, "12.50", "PAYMENT_STATUS_COMMITTED"), (declined, "5000.00", "PAYMENT_STATUS_DECLINED")]
    for amount, shown in (("1", "1.00"), ("2.5", "2.50"), ("0.25", "0.25"), ("3", "3.00"), ("4.75", "4.75")):
        payment_id = str(uuid.uuid4())
        r = gw.pay(token, payment_id, "user2", "BankB", amount)
        check(status_name(r.status) == "PAYMENT_STATUS_COMMITTED", f"Pay {amount}: {status_name(r.status)}")
        made.append((payment_id, shown, "PAYMENT_STATUS_COMMITTED"))
    check_balance(gw, token, "976.00", ("user1", "BankA"))
    ok("5 more payments committed; balance 976.00")

    step("ListPayments page_size 3 as user1@BankA")
    pages = gw.list_all(token, 3)
    sizes = [len(p.payments) for p in pages]
    check(sizes == [3, 3, 1], f"ListPayments page_size 3 over 7 payments: page sizes {sizes}")
    check(pages[-1].next_page_token == "", "the last page has a next_page_token")
    listed = [p for page in pages for p in page.payments]
    ids = [p.payment_id for p in listed]
    check(len(set(ids)) == len(ids), f"a payment appears twice across pages: {ids}")
    newest_first = [m[0] for m in reversed(made)]
    check(ids == newest_first, f"pages should list the 7 payments newest first:\n  got  {ids}\n  want {newest_first}")
    times = [p.create_time.ToNanoseconds() for p in listed]
    check(all(t > 0 for t in times), "a payment without create_time")
    check(times == sorted(times, reverse=True), "create_time is not newest first")
    for p, (payment_id, amount, status) in zip(listed, reversed(made)):
        got = (pb.Direction.Name(p.direction), p.counterparty.user, p.counterparty.bank, p.amount,
               status_name(p.status))
        check(got == ("DIRECTION_SENT", "user2", "BankB", amount, status), f"payment {payment_id}: {got}")
    check(reason_name(listed[-2].reason) == "DECLINE_REASON_INSUFFICIENT_FUNDS",
          f"the declined payment's reason: {reason_name(listed[-2].reason)}")
    ok("ListPayments page_size 3: pages of 3, 3, 1; every payment once, newest first; last token empty")

    step("ListPayments as user2@BankB")
    payee = gw.login("user2", "BankB", "pass2").token
    committed = {m[0] for m in made if m[2] == "PAYMENT_STATUS_COMMITTED"}
    listed = [p for page in gw.list_all(payee, 0) for p in page.payments]
    received = {p.payment_id: p for p in listed if p.payment_id in committed}
    check(set(received) == committed, f"user2 sees {sorted(received)} of the payments received {sorted(committed)}")
    p = received[first]
    got = (pb.Direction.Name(p.direction), p.counterparty.user, p.counterparty.bank, p.amount)
    check(got == ("DIRECTION_RECEIVED", "user1", "BankA", "12.50"), f"user2's view of the first payment: {got}")
    ok("ListPayments as user2@BankB: the payments from user1@BankA, direction RECEIVED")

    step("GetPayment as the payee")
    r = gw.payments.GetPayment(pb.GetPaymentRequest(payment_id=first), metadata=bearer(payee),
                               timeout=CALL_TIMEOUT_S)
    p = r.payment
    got = (p.payment_id, pb.Direction.Name(p.direction), p.counterparty.user, p.amount, status_name(p.status))
    check(got == (first, "DIRECTION_RECEIVED", "user1", "12.50", "PAYMENT_STATUS_COMMITTED"),
          f"GetPayment as the payee: {got}")
    ok("GetPayment of a received payment as the payee: RECEIVED, 12.50, COMMITTED")

    step("Logout")
    gw.payments.Logout(pb.LogoutRequest(), metadata=bearer(token), timeout=CALL_TIMEOUT_S)
    expect_error(lambda: gw.balance(token), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    ok("Logout; the token is then refused: UNAUTHENTICATED, ErrorInfo TOKEN_REVOKED")

    step("health")
    health = health_pb2_grpc.HealthStub(gw.channel)
    r = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
    check(r.status == health_pb2.HealthCheckResponse.SERVING,
          f"health: {health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}")
    ok("grpc.health.v1.Health/Check \"\": SERVING")

    check_reflection_v1alpha(gw.channel)
    check_reflection_v1(gw.channel)


def check_listed_services(names, version):
    names = set(names)
    banks = sorted(n for n in names if n.startswith("strife.bank."))
    check(not banks, f"reflection {version} lists the bank's API, which the gateway does not serve: {banks}")
    others = names - SERVED_SERVICES
    check(SERVED_SERVICES <= names, f"reflection {version} lacks {sorted(SERVED_SERVICES - names)}")
    check(all(n.startswith("grpc.reflection.") for n in others),
          f"reflection {version} lists services the gateway does not serve: {sorted(others)}")


def check_reflection_v1alpha(channel):
    step("reflection v1alpha")
    database = ProtoReflectionDescriptorDatabase(channel)
    check_listed_services(database.get_services(), "v1alpha")
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("strife.gateway.v1.PaymentsService")
    methods = {m.name for m in service.methods}
    want = {"Logout", "GetBalance", "Pay", "GetPayment", "ListPayments"}
    check(methods == want, f"PaymentsService by reflection has methods {sorted(methods)}, expected {sorted(want)}")
    payee = service.methods_by_name["Pay"].input_type.fields_by_name["payee"]
    check(payee.message_type.full_name == "strife.gateway.v1.Account", "PayRequest.payee is not an Account")
    ok("reflection v1alpha: lists exactly the served services; resolves PaymentsService")


def check_reflection_v1(channel):
    step("reflection v1")
    # grpcio-reflection ships only v1alpha stubs; v1's messages are the same
    # on the wire, so its stubs serve for v1's method too.
    info = channel.stream_stream(
        REFLECTION_V1_METHOD,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT_S)
    response = next(responses)
    check(response.HasField("list_services_response"), f"reflection v1 answered {response}")
    check_listed_services([s.name for s in response.list_services_response.service], "v1")
    ok("reflection v1: lists exactly the served services")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="the cluster's directory (certificates in DIR/certs)")
    parser.add_argument("address", help="the gateway's address, host:port")
    parser.add_argument("--proto", type=Path, default=PROTO_DIR_DEFAULT,
                        help=f"the proto/ directory to generate stubs from (default: {PROTO_DIR_DEFAULT})")
    args = parser.parse_args()
    if not (args.dir / "certs").is_dir():
        parser.error(f"{args.dir / 'certs'} is not a directory: DIR must be a cluster's directory")
    if not args.proto.is_dir():
        parser.error(f"{args.proto} is not a directory")

    try:
        with tempfile.TemporaryDirectory(prefix="strife-stubs-") as out_dir:
            step("generating stubs with grpc_tools.protoc")
            pb, pb_grpc, protos = generate_stubs(args.proto.resolve(), Path(out_dir))
            ok(f"Python stubs generated from {', '.join(protos)}")
            step("connecting")
            with secure_channel(args.dir, args.address) as channel:
                try:
                    grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)
                except grpc.FutureTimeoutError as err:
                    raise CheckFailed(f"no mutual-TLS connection to {args.address} within {CALL_TIMEOUT_S} s") from err
                ok(f"mutual TLS to {args.address} ({GATEWAY_TLS_NAME}) with the client certificate")
                run_checks(Gateway(channel, pb, pb_grpc))
    except CheckFailed as failure:
        print(f"FAIL: {current_step}: {failure}", flush=True)
        return 1
    except grpc.RpcError as err:
        print(f"FAIL: {current_step}: unexpected {err.code().name}: {err.details()!r}", flush=True)
        return 1
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
