from ...driver import Driver


class Qcow2Driver(Driver):
    name = "qcow2"


DRIVER = Qcow2Driver()
