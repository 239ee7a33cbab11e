# cmake -DCMD="prog;arg;..." -DEXPECT="regex" -P expect_error.cmake
# Passes when the command exits non-zero with exactly one line on stderr matching EXPECT.
execute_process(COMMAND ${CMD} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(STRIP "${err}" err)
if(rc EQUAL 0)
  message(FATAL_ERROR "expected a failure, got exit 0\nstdout: ${out}\nstderr: ${err}")
endif()
if(NOT err MATCHES "${EXPECT}")
  message(FATAL_ERROR "stderr does not match '${EXPECT}': ${err}")
endif()
if(err MATCHES "\n")
  message(FATAL_ERROR "expected a one-line error, got:\n${err}")
endif()
message(STATUS "exit ${rc}: ${err}")
