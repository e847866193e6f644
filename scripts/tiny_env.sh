# Defaults for running the chapters on the tiny zoo (sourced by test.sh and build_book.sh);
# every value can be overridden from the environment.
export UOE_NB_MODE="${UOE_NB_MODE:-tiny}"
# Tiny models run fastest on one thread (the tests run two workers on two cores).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
export UOE_NB_PROGRESS="${UOE_NB_PROGRESS:-0}"
