package qemu

const childEnv = "TETHER_QEMU_TEST_CHILD"

func runChild() {}
