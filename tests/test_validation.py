"""The input rules of SPEC §2 and the STK callback parser."""

import pytest

from validation import (
    ValidationError,
    check_text,
    mask_phone,
    normalize_phone,
    parse_amount,
    parse_stk_callback,
    validate_push,
)


@pytest.mark.parametrize("raw, expected", [
    ("0712345678", "254712345678"),
    ("0112345678", "254112345678"),
    ("712345678", "254712345678"),
    ("112345678", "254112345678"),
    ("254712345678", "254712345678"),
    ("254112345678", "254112345678"),
    ("+254712345678", "254712345678"),
    ("+254112345678", "254112345678"),
    ("0712 345 678", "254712345678"),
    ("0712-345-678", "254712345678"),
    ("+254 712-345 678", "254712345678"),
    ("  0712345678  ", "254712345678"),
])
def test_every_accepted_phone_form_normalises(raw, expected):
    assert normalize_phone(raw) == expected


@pytest.mark.parametrize("raw", [
    "", "0812345678", "0212345678", "071234567", "07123456789", "+0712345678",
    "255712345678", "2540712345678", "+254 0712345678", "254812345678", "0712.345.678",
    "07I2345678", "٠٧١٢٣٤٥٦٧٨", "0712345678\n1", "+", "254", 712345678, 254712345678,
    None, True, ["0712345678"], {"phone": "0712345678"}, "0" * 200,
])
def test_rejected_phones_name_the_field_and_the_forms(raw):
    with pytest.raises(ValidationError) as exc:
        normalize_phone(raw)
    assert exc.value.code == "invalid_phone"
    assert exc.value.field == "phone"
    assert "07XXXXXXXX" in exc.value.message and "+254" in exc.value.message


@pytest.mark.parametrize("raw, expected", [
    (1, 1), (10, 10), (250_000, 250_000), ("1", 1), ("250000", 250_000), ("010", 10),
])
def test_whole_shillings_as_integer_or_digit_string(raw, expected):
    assert parse_amount(raw, 250_000) == expected


@pytest.mark.parametrize("raw", [
    0, -1, 250_001, 10.5, 10.0, True, False, "1e3", "10.5", "-1", " 10", "", "abc",
    None, [10], {"v": 10}, "１０", "٣", 10**30,
])
def test_bad_amounts_are_rejected(raw):
    with pytest.raises(ValidationError) as exc:
        parse_amount(raw, 250_000)
    assert (exc.value.code, exc.value.field) == ("invalid_amount", "amount")


def test_amount_limit_comes_from_configuration():
    assert parse_amount(500, 500) == 500
    with pytest.raises(ValidationError):
        parse_amount(501, 500)


def test_reference_of_twelve_characters_is_kept_and_thirteen_rejected_not_truncated():
    assert check_text("INV-2026_001", "reference", 12) == "INV-2026_001"
    with pytest.raises(ValidationError) as exc:
        check_text("INV-2026_0001", "reference", 12)
    assert (exc.value.code, exc.value.field) == ("invalid_reference", "reference")


@pytest.mark.parametrize("raw", ["", "a@b", "semi;colon", "ünïcode", "tab\t", 12, None])
def test_description_charset_and_type(raw):
    with pytest.raises(ValidationError) as exc:
        check_text(raw, "description", 13)
    assert exc.value.code == "invalid_description"


def _push(body):
    return validate_push(body, 250_000, "Default", "Default desc")


def test_push_body_defaults_reference_and_description():
    push = _push({"phone": "0712345678", "amount": "10"})
    assert (push.phone, push.amount, push.reference, push.description) == (
        "254712345678", 10, "Default", "Default desc")


def test_unknown_field_is_named():
    with pytest.raises(ValidationError) as exc:
        _push({"phone": "0712345678", "amount": 10, "status": "paid"})
    assert (exc.value.code, exc.value.field) == ("unknown_field", "status")


@pytest.mark.parametrize("missing", ["phone", "amount"])
def test_missing_required_field_is_named(missing):
    body = {"phone": "0712345678", "amount": 10}
    del body[missing]
    with pytest.raises(ValidationError) as exc:
        _push(body)
    assert (exc.value.code, exc.value.field) == ("missing_field", missing)


@pytest.mark.parametrize("body", [[], "x", 1, None])
def test_push_body_must_be_an_object(body):
    with pytest.raises(ValidationError) as exc:
        _push(body)
    assert exc.value.code == "invalid_body"


def test_mask_phone_keeps_prefix_and_last_three():
    assert mask_phone("254712345678") == "2547******678"
    assert mask_phone("not a phone") == "***"


SUCCESS = {"Body": {"stkCallback": {
    "MerchantRequestID": "29115-34620561-1",
    "CheckoutRequestID": "ws_CO_191220191020363925",
    "ResultCode": 0,
    "ResultDesc": "The service request is processed successfully.",
    "CallbackMetadata": {"Item": [
        {"Name": "Amount", "Value": 1.00},
        {"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"},
        {"Name": "Balance"},
        {"Name": "TransactionDate", "Value": 20191219102115},
        {"Name": "PhoneNumber", "Value": 254708374149},
    ]},
}}}


def test_success_callback_items_are_read_by_name():
    result = parse_stk_callback(SUCCESS)
    assert (result.checkout_request_id, result.result_code, result.amount, result.receipt) == (
        "ws_CO_191220191020363925", "0", 1, "NLJ7RT61SV")


def test_callback_item_order_does_not_matter():
    body = {"Body": {"stkCallback": dict(SUCCESS["Body"]["stkCallback"])}}
    items = list(reversed(SUCCESS["Body"]["stkCallback"]["CallbackMetadata"]["Item"]))
    body["Body"]["stkCallback"]["CallbackMetadata"] = {"Item": items}
    assert parse_stk_callback(body) == parse_stk_callback(SUCCESS)


def test_failure_callback_with_string_result_code():
    result = parse_stk_callback({"Body": {"stkCallback": {
        "MerchantRequestID": "m", "CheckoutRequestID": "ws_CO_1", "ResultCode": "1037",
        "ResultDesc": "No response from user."}}})
    assert (result.result_code, result.amount, result.receipt) == ("1037", None, None)


def test_fractional_callback_amount_is_not_a_whole_amount():
    body = {"Body": {"stkCallback": dict(SUCCESS["Body"]["stkCallback"])}}
    body["Body"]["stkCallback"]["CallbackMetadata"] = {"Item": [
        {"Name": "Amount", "Value": "10.50"}, {"Name": "MpesaReceiptNumber", "Value": "X"}]}
    result = parse_stk_callback(body)
    assert result.amount is None


@pytest.mark.parametrize("body", [
    None, [], {}, {"Body": {}}, {"Body": {"stkCallback": []}},
    {"Body": {"stkCallback": {"ResultCode": 0}}},
    {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1"}}},
    {"Body": {"stkCallback": {"CheckoutRequestID": 5, "ResultCode": 0}}},
    {"Body": {"stkCallback": {"CheckoutRequestID": "ws", "ResultCode": None}}},
    {"Body": {"stkCallback": {"CheckoutRequestID": "ws", "ResultCode": True}}},
    {"Body": {"stkCallback": {"CheckoutRequestID": "ws", "ResultCode": 0,
                              "CallbackMetadata": {"Item": "x"}}}},
])
def test_malformed_callbacks_are_rejected(body):
    with pytest.raises(ValidationError) as exc:
        parse_stk_callback(body)
    assert exc.value.code == "invalid_callback"
