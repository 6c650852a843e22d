"""kew test suite: real servers, no mocks."""
