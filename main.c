/* placeholder */ typedef int pressd_placeholder_t;
int main(void) { return 0; }
