"""CPU (millicores) and memory (bytes) quantities."""

from __future__ import annotations

import pytest

from sigmad.units import format_cpu, format_size, parse_cpu, parse_size

KI, MI, GI, TI = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512Mi", 512 * MI),
        ("2Gi", 2 * GI),
        ("1.5G", 1_500_000_000),
        ("1.5Gi", 3 * GI // 2),
        ("1024", 1024),
        ("128M", 128_000_000),
        ("4k", 4000),
        ("0.5k", 500),
        ("4K", 4000),
        ("4Ki", 4096),
        ("1Ti", TI),
        ("1T", 10**12),
        ("1Pi", 2**50),
        ("512MiB", 512 * MI),
        ("100B", 100),
        (" 64Mi ", 64 * MI),
        ("0", 0),
        (0, 0),
        (1024, 1024),
        (134217728, 128 * MI),
        (2.0, 2),
    ],
)
def test_parse_size_accepts(value, expected):
    assert parse_size(value) == expected
    assert isinstance(parse_size(value), int)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("8GG", '"8GG" is not a size'),
        ("-1", '"-1" is not a size'),
        (-1, '"-1" is not a size'),
        ("abc", '"abc" is not a size'),
        ("", '"" is not a size'),
        ("1.5", '"1.5" is not a whole number of bytes'),
        (1.5, '"1.5" is not a whole number of bytes'),
        ("1.0001K", '"1.0001K" is not a whole number of bytes'),
        ("2mi", '"2mi" is not a size'),
        ("Mi", '"Mi" is not a size'),
        (None, '"None" is not a size'),
    ],
)
def test_parse_size_rejects(value, reason):
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert reason in str(info.value)


@pytest.mark.parametrize("value", [True, False])
def test_parse_size_rejects_bool(value):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("500m", 500),
        ("2", 2000),
        (2, 2000),
        ("0.5", 500),
        (0.5, 500),
        ("1.5", 1500),
        (1.5, 1500),
        ("0", 0),
        (0, 0),
        ("0m", 0),
        ("0.001", 1),
        ("1m", 1),
        ("64", 64000),
        (" 250m ", 250),
    ],
)
def test_parse_cpu_accepts(value, expected):
    assert parse_cpu(value) == expected
    assert isinstance(parse_cpu(value), int)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0.0005", '"0.0005" is finer than one millicore'),
        ("1.5m", '"1.5m" is finer than one millicore'),
        ("abc", '"abc" is not a cpu quantity'),
        ("-1", '"-1" is not a cpu quantity'),
        (-1, '"-1" is not a cpu quantity'),
        ("", '"" is not a cpu quantity'),
        ("500M", '"500M" is not a cpu quantity'),
        ("2 cores", '"2 cores" is not a cpu quantity'),
        (None, '"None" is not a cpu quantity'),
    ],
)
def test_parse_cpu_rejects(value, reason):
    with pytest.raises(ValueError) as info:
        parse_cpu(value)
    assert reason in str(info.value)


@pytest.mark.parametrize("value", [True, False])
def test_parse_cpu_rejects_bool(value):
    with pytest.raises(ValueError, match="is not a cpu quantity"):
        parse_cpu(value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (100, "100"),
        (KI, "1Ki"),
        (1536, "1.5Ki"),
        (512 * MI, "512Mi"),
        (GI, "1Gi"),
        (2 * GI, "2Gi"),
        (1536 * MI, "1.5Gi"),
        (3 * TI, "3Ti"),
        (2**50, "1Pi"),
    ],
)
def test_format_size(size, text):
    assert format_size(size) == text


def test_format_size_rounds_inexact_values():
    assert format_size(int(1.4 * GI)) == "1.4Gi"
    assert format_size(128_000_000) == "122.1Mi"


@pytest.mark.parametrize(
    ("millis", "text"),
    [
        (0, "0"),
        (1, "1m"),
        (100, "100m"),
        (500, "500m"),
        (1000, "1"),
        (1500, "1.5"),
        (2000, "2"),
        (2500, "2.5"),
        (1050, "1050m"),
        (64000, "64"),
    ],
)
def test_format_cpu(millis, text):
    assert format_cpu(millis) == text


@pytest.mark.parametrize(
    "size", [0, 1, 100, KI, 1536, 64 * MI, 512 * MI, GI, 1536 * MI, 2 * GI, 8 * GI, TI]
)
def test_size_round_trip(size):
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("millis", [0, 1, 100, 250, 500, 999, 1000, 1050, 1500, 2000, 2500, 64000])
def test_cpu_round_trip(millis):
    assert parse_cpu(format_cpu(millis)) == millis


@pytest.mark.parametrize("text", ["500m", "2", "1.5", "250m", "0"])
def test_cpu_text_round_trip(text):
    assert format_cpu(parse_cpu(text)) == text


@pytest.mark.parametrize("text", ["512Mi", "2Gi", "1.5Gi", "1Ki", "0"])
def test_size_text_round_trip(text):
    assert format_size(parse_size(text)) == text
