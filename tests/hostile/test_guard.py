"""The guard itself: a segfault in the child is reported as a crash and the next call gets a fresh child."""

import hostile


def test_a_segfault_in_the_child_is_a_crash_and_the_guard_keeps_serving(guard):
    out = guard.call("ctypes:string_at", 0)  # reads address 0: SIGSEGV
    assert out.crashed and out.exitcode not in (0, None)
    assert guard.call("math:sqrt", 4.0).value == 2.0


def test_errors_come_back_with_their_type_and_message(guard):
    out = guard.call("math:sqrt", -1.0)
    assert out.raised and out.error_type is ValueError and "domain" in out.message


def test_expect_clear_error_needs_a_named_argument():
    out = hostile.run(int, "x")
    try:
        hostile.expect_clear_error(out, "nothing-named-this")
    except AssertionError:
        hostile.COUNTS["wrong"] -= 1  # this test provoked the miss on purpose
    else:
        raise AssertionError("an error that names no argument passed as clear")
