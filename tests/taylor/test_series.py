import math

import pytest

from curvkit.taylor._series import faa_di_bruno_terms, integer_partitions


def test_partition_counts():
    # p(k) for k = 1..8
    assert [len(integer_partitions(k)) for k in range(1, 9)] == [1, 2, 3, 5, 7, 11, 15, 22]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_faa_di_bruno_multiplicities_count_set_partitions(k):
    # summing the multiplicities per number of parts gives the Stirling numbers of the 2nd kind
    def stirling2(n, m):
        terms = ((-1) ** i * math.comb(m, i) * (m - i) ** n for i in range(m + 1))
        return sum(terms) // math.factorial(m)

    for m, terms in faa_di_bruno_terms(k).items():
        assert sum(c for c, _ in terms) == stirling2(k, m)


def test_order_four_terms_match_closed_form():
    # h4 = f'''' x1^4 + 6 f''' x1^2 x2 + 4 f'' x1 x3 + 3 f'' x2^2 + f' x4
    terms = faa_di_bruno_terms(4)
    assert dict((s, c) for c, s in terms[2]) == {(3, 1): 4.0, (2, 2): 3.0}
    assert terms[3] == ((6.0, (2, 1, 1)),)
    assert terms[4] == ((1.0, (1, 1, 1, 1)),)
    assert terms[1] == ((1.0, (4,)),)
